//! The VM run state as QMP reports it (`query-status`), with the subset of QEMU 7.2's
//! states and transitions this machine can reach.

/// Where the VM is in its life, as `query-status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Built but never started (`-S`), or reset while stopped.
    Prelaunch,
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest powered off under `-no-shutdown`.
    Shutdown,
    /// A vCPU failed and cannot continue.
    InternalError,
    /// A disk's error policy stopped the VM (`werror=stop`, ...); `cont` retries.
    IoError,
    /// A destination waiting for (or loading) its incoming migration.
    InMigrate,
    /// The source stopped for the last part of a migration.
    FinishMigrate,
    /// The source after its guest moved away; `cont` runs it here again.
    PostMigrate,
}

impl RunState {
    /// The `status` string of `query-status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }

    pub fn is_running(self) -> bool {
        self == RunState::Running
    }

    /// States `cont` refuses until a `system_reset` (QEMU's runstate_needs_reset).
    pub fn needs_reset(self) -> bool {
        matches!(self, RunState::Shutdown | RunState::InternalError)
    }

    /// The state after a machine reset: a running VM keeps running; any stopped one
    /// waits in prelaunch for `cont`, as QEMU does.
    pub fn after_reset(self) -> RunState {
        if self.is_running() {
            RunState::Running
        } else {
            RunState::Prelaunch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_qemu() {
        assert_eq!(RunState::Prelaunch.as_str(), "prelaunch");
        assert_eq!(RunState::InternalError.as_str(), "internal-error");
        assert_eq!(RunState::Shutdown.as_str(), "shutdown");
    }

    #[test]
    fn reset_rules() {
        assert_eq!(RunState::Running.after_reset(), RunState::Running);
        for s in [
            RunState::Paused,
            RunState::Shutdown,
            RunState::InternalError,
            RunState::Prelaunch,
        ] {
            assert_eq!(s.after_reset(), RunState::Prelaunch);
        }
        assert!(RunState::Shutdown.needs_reset());
        assert!(RunState::InternalError.needs_reset());
        assert!(!RunState::Paused.needs_reset());
        assert!(!RunState::Prelaunch.needs_reset());
    }
}
