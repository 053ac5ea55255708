//! The live map page (`GET /`): its JavaScript logic under node's test runner
//! (`server/src/page/map.test.js`), and the page itself in headless Chromium against a real
//! `dongflow demo` (`tests/browser/map_page.mjs`, with playwright-core from `tests/browser`).
//!
//! Without node, Chromium or `npm ci --prefix tests/browser` these tests say what is missing and
//! skip; with `DONGFLOW_REQUIRE_BROWSER=1` (CI) they fail instead. Screenshots and load figures go
//! to `target/browser-artifacts/`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `Some(())` when `what` is there; otherwise a skip note, or a failure when the browser tests are required.
fn need(present: bool, what: &str) -> Option<()> {
    if present {
        return Some(());
    }
    assert!(
        std::env::var("DONGFLOW_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "DONGFLOW_REQUIRE_BROWSER=1 but {what} is missing"
    );
    eprintln!("skipping: {what} is missing");
    None
}

fn has_node() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(command: &mut Command) {
    let out = command.output().expect("the test program starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "{command:?} failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn map_page_logic_passes_its_unit_tests() {
    let Some(()) = need(has_node(), "node") else {
        return;
    };
    run(Command::new("node")
        .args(["--test", "server/src/page/"])
        .current_dir(root()));
}

#[test]
fn map_page_works_in_headless_chromium() {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let playwright = root().join("tests/browser/node_modules/playwright-core");
    let ready = need(has_node(), "node")
        .and_then(|()| need(chromium.exists(), "chromium (apt-get install chromium)"))
        .and_then(|()| {
            need(
                playwright.exists(),
                "playwright-core (npm ci --prefix tests/browser)",
            )
        });
    if ready.is_none() {
        return;
    }
    let districts = std::env::var_os("DONGFLOW_DISTRICTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data/districts"));
    let mut command = Command::new("node");
    command
        .arg("tests/browser/map_page.mjs")
        .current_dir(root())
        .env("DONGFLOW_BIN", env!("CARGO_BIN_EXE_dongflow"))
        .env("CHROMIUM", &chromium)
        .env("ARTIFACTS", root().join("target/browser-artifacts"));
    if districts.join("seoul-admdong.geojson").exists() {
        command.env("DISTRICTS_DIR", &districts);
    } else {
        assert!(
            std::env::var_os("DONGFLOW_REQUIRE_DATA").is_none(),
            "{} is missing and DONGFLOW_REQUIRE_DATA is set",
            districts.display()
        );
        eprintln!("the real maps are missing: checking the built-in map only");
    }
    run(&mut command);
}
