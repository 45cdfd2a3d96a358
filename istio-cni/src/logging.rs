//! How the agent's log lines look: plain text with no terminal colour codes unless a
//! person is watching (stdout is a terminal) and has not asked for none (`NO_COLOR`).
//! In a pod stdout is a pipe or a file that log pipelines parse; tracing-subscriber
//! would colour it whenever allowed to, terminal or not.

/// Whether plain log lines carry colour codes.
pub fn colours(stdout_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stdout_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colours;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(!colours(false, None));
        assert!(!colours(false, Some("".into())));
        assert!(colours(true, None));
        assert!(!colours(true, Some("1".into())));
    }
}
