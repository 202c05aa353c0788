//! The README's curl walkthrough ("The API in five minutes"): the block itself, and what a run
//! of it must print. Run against a cluster by `tests/serve/startup.rs` and by `tests/stores.rs`
//! (on the private stores of a fresh host).

use serde_json::{Value, json};

/// The walkthrough's first line, which a test may point at its own proxy port.
pub const FIRST_LINE: &str = "API=http://localhost:8080/api/v1\n";

/// The first `sh` code block after the "The API in five minutes" heading.
pub fn script() -> String {
    let readme = include_str!("../../README.md");
    let section = readme
        .split_once("## The API in five minutes")
        .expect("README has the walkthrough section")
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("the walkthrough section has an sh block")
        .1;
    let script = block
        .split_once("```")
        .expect("the sh block is closed")
        .0
        .to_owned();
    assert!(
        script.starts_with(FIRST_LINE),
        "the walkthrough no longer starts with {FIRST_LINE:?}:\n{script}"
    );
    script
}

/// Fails clearly when a tool the walkthrough uses is missing.
pub fn require_tools() {
    for tool in ["curl", "jq"] {
        let found = std::process::Command::new(tool).arg("--version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "the README walkthrough needs {tool} (.ci/run installs it)"
        );
    }
}

/// Checks every value a run printed (jq output and bare status codes).
pub fn check_output(stdout: &str) {
    // What it prints is a sequence of JSON values (jq output and bare status codes).
    let printed: Vec<Value> = serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("walkthrough printed non-JSON ({e}):\n{stdout}"));
    assert_eq!(printed.len(), 14, "{stdout}");
    let email = printed[0]["email"]
        .as_str()
        .expect("jq .user shows the user");
    assert!(
        email.starts_with("ada-") && email.ends_with("@example.com"),
        "{stdout}"
    );
    assert_eq!(printed[0]["name"], "Ada");
    assert_eq!(printed[1]["email"], email, "GET /me is the caller");
    assert_eq!(printed[2]["status"], "pending");
    assert_eq!(printed[2]["priority"], "medium");
    assert_eq!(
        printed[3],
        json!({"limit": 10, "page": 1, "total": 1, "totalPages": 1}),
        "pending high/urgent tasks"
    );
    assert_eq!(printed[4], json!(["Write the quarterly report"]), "search");
    assert_eq!(printed[5], json!(["Book the dentist"]), "categoryId=none");
    assert_eq!(printed[6]["limit"], 1);
    assert_eq!(printed[6]["hasMore"], true);
    assert!(
        printed[6]["nextCursor"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
    assert_eq!(printed[7]["status"], "completed");
    assert!(printed[7]["completedAt"].as_str().is_some(), "{stdout}");
    assert_eq!(printed[7]["dueAt"], Value::Null);
    assert_eq!(printed[8]["status"], 422);
    assert!(printed[8]["errors"][0]["field"] == "title", "{stdout}");
    assert_eq!(
        printed[9..],
        [json!(401), json!(204), json!(204), Value::Null, json!(204)],
        "refresh re-use, logout, category delete, the task's categoryId, task delete"
    );
}
