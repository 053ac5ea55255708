//! Hosts of their own on this machine: a network namespace per cluster process, each joined by a
//! veth pair to a bridge in the test's namespace, where the broker listens on the bridge's address.
//! Nothing then relies on a shared loopback, each process binds its own address (fixed ports, no
//! race: no other test is in that namespace), and a link can be cut by bringing its veth down.

use std::process::Command;

/// The namespaces, veths and bridge of one test; all removed on drop.
pub struct Net {
    tag: String,
    subnet: String,
    hosts: usize,
}

/// Runs `ip ARGS`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// `hosts` namespaces on a bridge, or `None` (with a note) where namespaces cannot be made
    /// (not root, no iproute2) and `DONGFLOW_REQUIRE_NETNS` is not `1`.
    pub fn create(hosts: usize) -> Option<Net> {
        let possible = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success())
            && is_root();
        if !possible {
            assert!(
                std::env::var("DONGFLOW_REQUIRE_NETNS").as_deref() != Ok("1"),
                "DONGFLOW_REQUIRE_NETNS=1 but network namespaces cannot be made here (root and \
                 iproute2 are needed)"
            );
            eprintln!("SKIPPED: network namespaces need root and iproute2");
            return None;
        }
        let pid = std::process::id();
        let net = Net {
            tag: format!("df{}", pid % 100_000),
            subnet: format!("10.{}.{}", 100 + pid % 100, (pid / 100) % 250),
            hosts,
        };
        net.remove();
        let bridge = net.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip()),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for h in 0..hosts {
            let ns = net.namespace(h);
            let (outer, inner) = (net.outer(h), format!("{}i{h}", net.tag));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "master", &bridge]);
            ip(&["link", "set", &outer, "up"]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &ns, "ip"];
                all.extend(args);
                ip(&all);
            };
            inside(&["addr", "add", &format!("{}/24", net.ip(h)), "dev", &inner]);
            inside(&["link", "set", &inner, "up"]);
            inside(&["link", "set", "lo", "up"]);
        }
        Some(net)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    fn outer(&self, host: usize) -> String {
        format!("{}o{host}", self.tag)
    }

    /// The namespace of host `host`.
    pub fn namespace(&self, host: usize) -> String {
        format!("{}ns{host}", self.tag)
    }

    /// The address of host `host`.
    pub fn ip(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, 10 + host)
    }

    /// The test's own address on the bridge (where the broker listens).
    pub fn host_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Cuts host `host`'s link: it reaches neither the others nor the broker, and no connection is
    /// closed (nothing tells either side).
    pub fn cut(&self, host: usize) {
        ip(&["link", "set", &self.outer(host), "down"]);
    }

    /// Mends host `host`'s link.
    pub fn mend(&self, host: usize) {
        ip(&["link", "set", &self.outer(host), "up"]);
    }

    fn remove(&self) {
        for h in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(h)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.outer(h)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Whether this process runs as root (namespaces and links need it).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
