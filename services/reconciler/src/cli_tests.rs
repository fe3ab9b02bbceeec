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

#[test]
fn dlq_topics_and_checkpoints_are_one_setting_before_or_after_the_subcommand() {
    for args in [
        &["reconciler", "--dlq-topics=a.dlq,b.dlq", "--replay-checkpoints", "cp", "dlq", "list"][..],
        &["reconciler", "dlq", "list", "--dlq-topics=a.dlq,b.dlq", "--replay-checkpoints", "cp"],
        &["reconciler", "dlq", "replay", "--dlq-topics", "a.dlq,b.dlq", "--checkpoint-topic", "cp"],
    ] {
        let c = Config::parse_from(args);
        assert_eq!(c.ops.dlq.dlq_topics, ["a.dlq", "b.dlq"], "{args:?}");
        assert_eq!(c.ops.replay_checkpoints, "cp", "{args:?}");
    }
}
