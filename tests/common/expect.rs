//! What a task listing should return, computed in plain Rust from the tasks a test created, so
//! the server's SQL is checked against an independent statement of the contract.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::uuid;

/// A task as the API returned it.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: Uuid,
    pub title: String,
    pub description: Option<String>,
    pub status: String,
    pub priority: String,
    pub due_at: Option<DateTime<Utc>>,
    pub category_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn time(value: &Value) -> Option<DateTime<Utc>> {
    value.as_str().map(|s| {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
            .with_timezone(&Utc)
    })
}

impl Task {
    pub fn from_json(value: &Value) -> Self {
        Self {
            id: uuid(&value["id"]),
            title: value["title"].as_str().unwrap().to_owned(),
            description: value["description"].as_str().map(str::to_owned),
            status: value["status"].as_str().unwrap().to_owned(),
            priority: value["priority"].as_str().unwrap().to_owned(),
            due_at: time(&value["dueAt"]),
            category_id: value["categoryId"]
                .as_str()
                .map(|_| uuid(&value["categoryId"])),
            created_at: time(&value["createdAt"]).unwrap(),
            updated_at: time(&value["updatedAt"]).unwrap(),
        }
    }
}

pub fn priority_rank(priority: &str) -> u8 {
    match priority {
        "low" => 0,
        "medium" => 1,
        "high" => 2,
        "urgent" => 3,
        other => panic!("unknown priority {other}"),
    }
}

/// Words are maximal runs of alphanumeric characters, compared lower-cased.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether every word of `query` is a prefix of some word of the title or description.
pub fn matches_search(task: &Task, query: &str) -> bool {
    let mut text = words(&task.title);
    text.extend(words(task.description.as_deref().unwrap_or("")));
    words(query)
        .iter()
        .all(|q| text.iter().any(|w| w.starts_with(q.as_str())))
}

fn compare_key(a: &Task, b: &Task, key: &str) -> Ordering {
    match key {
        "createdAt" => a.created_at.cmp(&b.created_at),
        "updatedAt" => a.updated_at.cmp(&b.updated_at),
        // No due date sorts after every date.
        "dueAt" => match (a.due_at, b.due_at) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => x.cmp(&y),
        },
        "priority" => priority_rank(&a.priority).cmp(&priority_rank(&b.priority)),
        "title" => a
            .title
            .to_lowercase()
            .as_bytes()
            .cmp(b.title.to_lowercase().as_bytes()),
        other => panic!("unknown sort key {other}"),
    }
}

/// `tasks` ordered by `sort` (the API's syntax; empty means the default `-createdAt`), ties
/// broken by id in the direction of the last key.
pub fn sorted(tasks: &[Task], sort: &str) -> Vec<Task> {
    let sort = if sort.is_empty() { "-createdAt" } else { sort };
    let keys: Vec<(&str, bool)> = sort
        .split(',')
        .map(|part| match part.strip_prefix('-') {
            Some(key) => (key, true),
            None => (part, false),
        })
        .collect();
    let id_desc = keys.last().unwrap().1;
    let mut tasks = tasks.to_vec();
    tasks.sort_by(|a, b| {
        keys.iter()
            .map(|&(key, desc)| {
                let order = compare_key(a, b, key);
                if desc { order.reverse() } else { order }
            })
            .find(|o| o.is_ne())
            .unwrap_or_else(|| {
                let order = a.id.cmp(&b.id);
                if id_desc { order.reverse() } else { order }
            })
    });
    tasks
}

/// The ids the listing should return for `filter` and `sort`, in order.
pub fn expected_ids(tasks: &[Task], filter: impl Fn(&Task) -> bool, sort: &str) -> Vec<Uuid> {
    let matching: Vec<Task> = tasks.iter().filter(|t| filter(t)).cloned().collect();
    sorted(&matching, sort).into_iter().map(|t| t.id).collect()
}
