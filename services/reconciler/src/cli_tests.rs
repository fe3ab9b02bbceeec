//! The command line: every subcommand parses and clap's own consistency checks pass.

use clap::{CommandFactory, Parser};

use crate::{Command, Config};

#[test]
fn the_command_line_is_consistent() {
    Config::command().debug_assert();
}

#[test]
fn operator_commands_parse_with_their_filters() {
    let c =
        Config::parse_from(["reconciler", "dlq", "replay", "--service", "salesforce-sink", "--code", "X", "--dry-run"]);
    let Some(Command::Dlq(crate::dlq::cli::DlqCommand::Replay { select, dry_run, .. })) = c.command else {
        panic!("not a replay")
    };
    assert!(dry_run);
    assert_eq!(select.services, ["salesforce-sink"]);
    let c = Config::parse_from(["reconciler", "report", "--date", "2026-11-30", "--format", "json", "--out", "-"]);
    assert!(matches!(c.command, Some(Command::Report(ref a)) if a.date.as_deref() == Some("2026-11-30")));
    assert!(Config::parse_from(["reconciler"]).command.is_none(), "no subcommand runs the service");
}
