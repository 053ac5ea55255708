//! Bearer tokens for the HTTP API (`--http-token-file`, CONTRACT section 6).
//!
//! The file lists one token a line (blank lines and `#` comments are skipped). Only SHA-256 digests
//! of the tokens are kept, and a presented token is compared with every one of them in constant
//! time, so neither the comparison's timing nor a memory dump gives a token away. SIGHUP re-reads
//! the file: a token removed from it is refused from then on, without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// Why the token file cannot be used.
#[derive(Debug, Error)]
pub enum TokenFileError {
    /// It cannot be read.
    #[error("cannot read token file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (shown in this error's message, so not chained as its source).
        error: std::io::Error,
    },
    /// It lists no token: nobody could use the API.
    #[error("token file {} lists no token", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The accepted tokens, as digests; swapped whole when the file is read again.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    digests: ArcSwap<Vec<[u8; 32]>>,
}

impl Tokens {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        Ok(Self {
            digests: ArcSwap::from_pointee(read_digests(path)?),
            path: path.to_owned(),
        })
    }

    /// Reads the file again; on an error the tokens accepted so far stay, and the error is returned.
    /// Returns how many tokens are accepted now.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let digests = read_digests(&self.path)?;
        let n = digests.len();
        self.digests.store(Arc::new(digests));
        Ok(n)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an `Authorization` header value carries an accepted bearer token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(bearer) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token).into();
        // Every digest is compared, whichever matches: the time taken says nothing of which.
        self.digests
            .load()
            .iter()
            .fold(subtle::Choice::from(0), |found, d| {
                found | d.ct_eq(&presented)
            })
            .into()
    }
}

/// The token of `Bearer TOKEN` (the scheme in any case, RFC 7235).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn read_digests(path: &Path) -> Result<Vec<[u8; 32]>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| TokenFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    let digests: Vec<[u8; 32]> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|t| Sha256::digest(t.as_bytes()).into())
        .collect();
    if digests.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("dongflow-tokens-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn only_listed_tokens_are_admitted() {
        let path = file("admit", "# ops team\nalpha-123\n\n  beta-456  \n");
        let tokens = Tokens::load(&path).expect("loads");
        assert!(tokens.admits(Some(b"Bearer alpha-123")));
        assert!(tokens.admits(Some(b"bearer beta-456")));
        assert!(!tokens.admits(Some(b"Bearer alpha-12")));
        assert!(!tokens.admits(Some(b"Bearer alpha-1234")));
        assert!(!tokens.admits(Some(b"Basic alpha-123")));
        assert!(!tokens.admits(Some(b"Bearer ")));
        assert!(!tokens.admits(Some(b"Bearer # ops team")));
        assert!(!tokens.admits(None));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn reload_revokes_and_a_bad_reload_keeps_the_old_tokens() {
        let path = file("reload", "old\n");
        let tokens = Tokens::load(&path).expect("loads");
        std::fs::write(&path, "new\n").expect("write");
        assert_eq!(tokens.reload().expect("reloads"), 1);
        assert!(!tokens.admits(Some(b"Bearer old")));
        assert!(tokens.admits(Some(b"Bearer new")));
        std::fs::write(&path, "\n# nothing\n").expect("write");
        let err = tokens.reload().expect_err("empty file refused");
        assert!(err.to_string().ends_with("lists no token"), "{err}");
        assert!(tokens.admits(Some(b"Bearer new")));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_missing_file_is_one_error_naming_it() {
        let err = Tokens::load(Path::new("/no/such/tokens")).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("cannot read token file /no/such/tokens: "),
            "{err}"
        );
    }
}
