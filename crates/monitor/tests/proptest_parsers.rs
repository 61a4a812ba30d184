//! Property tests: random bytes and random lines into both front ends never panic, always get
//! a well-formed answer, and (HMP) a line that does not parse never touches the VM.

mod common;

use common::mock_vm;
use monitor::hmp::parse::{parse_line, DumpDefaults, COMMANDS, INFO_COMMANDS};
use monitor::hmp::HmpSession;
use monitor::qmp::{JsonItem, JsonStreamer, QmpSession};
use monitor::{Backend, RunState};
use proptest::prelude::*;
use serde_json::Value;

fn split_items(chunks: &[Vec<u8>]) -> Vec<JsonItem> {
    let mut s = JsonStreamer::new(4096);
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, &mut out);
    }
    s.finish(&mut out);
    out
}

fn check_reply(r: &Value) {
    let obj = r.as_object().expect("reply is an object");
    let has_return = obj.contains_key("return");
    let has_error = obj.contains_key("error");
    assert!(has_return ^ has_error, "exactly one of return/error: {r}");
    if has_error {
        assert!(
            r["error"]["class"].is_string() && r["error"]["desc"].is_string(),
            "{r}"
        );
    }
    assert!(
        obj.keys()
            .all(|k| matches!(k.as_str(), "return" | "error" | "id")),
        "{r}"
    );
}

/// Bytes that look a little like QMP: fragments of real messages mixed with noise.
fn qmpish() -> impl Strategy<Value = Vec<u8>> {
    let frag = prop_oneof![
        Just(b"{\"execute\":\"qmp_capabilities\"}".to_vec()),
        Just(b"{\"execute\":\"query-status\",\"id\":1}".to_vec()),
        Just(b"{\"execute\":\"stop\"}".to_vec()),
        Just(b"{\"execute\":\"cont\",\"arguments\":{}}".to_vec()),
        Just(b"{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info status\"}}".to_vec()),
        Just(b"{\"arguments\":".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"{[".to_vec()),
        Just(b"]}".to_vec()),
        Just(b"\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..32),
    ];
    prop::collection::vec(frag, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn qmp_stream_is_chunking_invariant_and_every_item_gets_a_reply(
        bytes in prop_oneof![qmpish(), prop::collection::vec(any::<u8>(), 0..512)],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let whole = split_items(std::slice::from_ref(&bytes));
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(bytes[last..p].to_vec());
            last = p;
        }
        chunks.push(bytes[last..].to_vec());
        prop_assert_eq!(&split_items(&chunks), &whole);

        let vm = mock_vm(RunState::Running);
        let mut session = QmpSession::new(vm.monitor.clone());
        for item in whole {
            check_reply(&session.handle(item));
        }
    }

    #[test]
    fn qmp_random_commands_with_random_arguments(
        name in prop_oneof![
            prop::sample::select(vec!["query-status", "stop", "cont", "system_reset", "migrate", "migrate-set-parameters",
                "migrate-set-capabilities", "human-monitor-command", "snapshot-delete", "job-dismiss", "query-jobs",
                "migrate-incoming", "qmp_capabilities", "query-commands"]).prop_map(String::from),
            "[a-z_-]{0,12}",
        ],
        args in prop::collection::btree_map("[a-z-]{1,12}", prop_oneof![
            Just(Value::Null), any::<bool>().prop_map(Value::from), any::<i64>().prop_map(Value::from),
            "[ -~]{0,16}".prop_map(Value::from), Just(serde_json::json!([1, "x"])), Just(serde_json::json!({"a": 1})),
        ], 0..4),
    ) {
        let vm = mock_vm(RunState::Running);
        let mut session = QmpSession::new(vm.monitor.clone());
        session.handle(JsonItem::Value(serde_json::json!({"execute": "qmp_capabilities"})));
        let args: serde_json::Map<String, Value> = args.into_iter().collect();
        let msg = serde_json::json!({"execute": name, "arguments": args, "id": "p"});
        let r = session.handle(JsonItem::Value(msg));
        check_reply(&r);
        prop_assert_eq!(&r["id"], "p");
    }

    #[test]
    fn hmp_random_lines_never_panic_and_bad_ones_leave_the_vm_alone(
        line in prop_oneof![
            ".{0,80}",
            (
                prop::sample::select(
                    COMMANDS.iter().chain(INFO_COMMANDS).flat_map(|e| e.names.split('|')).collect::<Vec<_>>()
                ),
                prop::collection::vec(prop_oneof![
                    "[a-z0-9_/\\-]{1,8}", Just("\"".to_string()), Just("/10xb".to_string()), Just("0x".to_string()),
                    "[0-9]{1,20}", "[()+*%~$-]{1,3}", Just("info".to_string()), Just("on".to_string()),
                ], 0..4),
            ).prop_map(|(c, args)| format!("{c} {}", args.join(" "))),
        ],
    ) {
        let vm = mock_vm(RunState::Running);
        let rx = vm.events.subscribe(1024);
        let parsed = parse_line(&line, &mut DumpDefaults::default());
        let mut session = HmpSession::new(vm.monitor.clone(), false);
        let mut out = Vec::new();
        session.execute_line(&line, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        prop_assert!(text.is_empty() || text.ends_with("\r\n"), "{:?}", text);
        if parsed.is_err() {
            prop_assert!(!text.is_empty());
            prop_assert_eq!(text.matches("\r\n").count(), 1, "one line: {:?}", text);
            prop_assert_eq!(vm.vm.run_state(), RunState::Running);
            prop_assert!(rx.try_recv().is_err(), "an unparsable line emitted an event");
            prop_assert!(!vm.vm.quit_requested());
        }
    }
}
