//! How the agent's and ztunnel's log lines look: plain text with no terminal colour
//! codes unless a person is watching (stdout is a terminal) and has not asked for none
//! (`NO_COLOR`). In a pod stdout is a pipe or a file that log pipelines parse;
//! tracing-subscriber colours whenever it is allowed to, terminal or not, so both
//! binaries ask this first.

/// Whether plain log lines carry colour codes.
pub fn colours(stdout_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stdout_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// [`colours`] for this process's stdout and environment.
pub fn colours_here() -> bool {
    use std::io::IsTerminal;
    colours(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR"),
    )
}

#[cfg(test)]
mod tests {
    use super::colours;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        // A container's stdout (a pipe or a file): never, whatever NO_COLOR says.
        assert!(!colours(false, None));
        assert!(!colours(false, Some("".into())));
        // A terminal: unless NO_COLOR is set to something.
        assert!(colours(true, None));
        assert!(colours(true, Some("".into())));
        assert!(!colours(true, Some("1".into())));
    }
}
