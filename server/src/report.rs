//! An error with its causes, on one line, for logs: each error's `Display` says only itself (so
//! that anyhow's `{:#}` in `main` prints every cause once), and a log line names them all.

use std::error::Error;
use std::fmt;

/// Displays an error and then each of its sources, `: `-separated.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;
    use crate::recovery::CheckpointError;

    #[test]
    fn a_chain_names_each_cause_once() {
        let e = CheckpointError::Io {
            path: "state/checkpoint-1".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(e.to_string(), "state/checkpoint-1");
        assert_eq!(
            Chain(&e).to_string(),
            "state/checkpoint-1: entity not found"
        );
    }
}
