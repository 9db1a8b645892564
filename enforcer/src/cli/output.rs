//! Writing answers to standard output: JSON with `--json`, tables otherwise.

use std::io::{ErrorKind, Write};

use super::rpc::fail;

/// Where and how answers are printed.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    /// JSON when `json`, tables otherwise.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Whether answers are printed as JSON.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints one answer. Both forms are closures so that only the one needed is built.
    pub fn emit(
        &self,
        json: impl FnOnce() -> serde_json::Value,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            let doc = serde_json::to_string_pretty(&json())
                .map_err(|e| fail(format!("cannot encode the answer as JSON: {e}")))?;
            write_stdout(&doc)
        } else {
            write_stdout(&text())
        }
    }
}

/// Writes `text` and a final newline if it lacks one, and flushes (callers may exit the
/// process right after).
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|()| out.flush());
    match written {
        // `allot catalog show | head` closes the pipe early; the reader got what it wanted.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(fail(format!("cannot write to standard output: {e}"))),
        Ok(()) => Ok(()),
    }
}
