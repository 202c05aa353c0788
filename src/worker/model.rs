//! Enumerations shared by the API and the stores. Each has one spelling on the wire (JSON) and
//! one in PostgreSQL, and converts between them here only.

use serde::{Deserialize, Serialize};

use super::error::FieldError;
use utoipa::ToSchema;

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        // The wire spelling is the snake_case variant name; `wire_spellings_match` checks that
        // it equals `$text`, which the SQL side uses.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling in PostgreSQL (not every enum is stored by its text).
            #[allow(dead_code)]
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the wire spelling; `None` for anything else.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }

            /// The accepted spellings, for error messages.
            pub fn expected() -> String {
                [$($text),+].join(", ")
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                Self::parse(&text).ok_or_else(|| format!("unexpected {} {text:?}", stringify!($name)))
            }
        }
    };
}

text_enum!(
    /// What a user may do: admins manage users.
    Role { User = "user", Admin = "admin" }
);
text_enum!(
    /// The user's plan; sets their rate limit.
    Tier { Free = "free", Pro = "pro", Enterprise = "enterprise" }
);
text_enum!(
    /// Where a task stands.
    Status { Pending = "pending", InProgress = "in_progress", Completed = "completed" }
);
text_enum!(
    /// How urgent a task is; sorts by rank (low < medium < high < urgent).
    Priority { Low = "low", Medium = "medium", High = "high", Urgent = "urgent" }
);

impl Priority {
    /// The rank stored in PostgreSQL (0 low .. 3 urgent).
    pub fn rank(self) -> i16 {
        match self {
            Priority::Low => 0,
            Priority::Medium => 1,
            Priority::High => 2,
            Priority::Urgent => 3,
        }
    }
}

impl TryFrom<i16> for Priority {
    type Error = String;
    fn try_from(rank: i16) -> Result<Self, String> {
        Priority::ALL
            .get(usize::try_from(rank).map_err(|_| format!("bad priority rank {rank}"))?)
            .copied()
            .ok_or_else(|| format!("bad priority rank {rank}"))
    }
}

/// Lower-cases and checks an email address: one `@`, something on both sides, no spaces.
pub fn normalize_email(raw: &str) -> Result<String, FieldError> {
    let email = raw.trim().to_lowercase();
    let valid = (3..=254).contains(&email.chars().count())
        && !email.chars().any(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        });
    if valid {
        Ok(email)
    } else {
        Err(FieldError::new("email", "must be an email address"))
    }
}

pub fn check_password(field: &str, password: &str) -> Result<(), FieldError> {
    match password.chars().count() {
        n if n < 8 => Err(FieldError::new(field, "must be at least 8 characters")),
        n if n > 256 => Err(FieldError::new(field, "must be at most 256 characters")),
        _ => Ok(()),
    }
}

pub fn check_name(name: &str) -> Result<String, FieldError> {
    let name = name.trim();
    if (1..=100).contains(&name.chars().count()) {
        Ok(name.to_owned())
    } else {
        Err(FieldError::new("name", "must be 1 to 100 characters"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::PartialSchema;

    #[test]
    fn priority_rank_round_trips_in_order() {
        for (i, p) in Priority::ALL.iter().enumerate() {
            assert_eq!(p.rank(), i as i16);
            assert_eq!(Priority::try_from(p.rank()).unwrap(), *p);
        }
        assert!(Priority::try_from(4).is_err());
        assert!(Priority::try_from(-1).is_err());
    }

    #[test]
    fn wire_spellings_match() {
        fn check<T: Serialize + Copy>(all: &[T], text: fn(T) -> &'static str) {
            for v in all {
                assert_eq!(serde_json::to_value(v).unwrap(), text(*v));
            }
        }
        check(Role::ALL, Role::as_str);
        check(Tier::ALL, Tier::as_str);
        check(Status::ALL, Status::as_str);
        check(Priority::ALL, Priority::as_str);
        let schema = serde_json::to_value(Status::schema()).unwrap();
        assert_eq!(
            schema["enum"],
            serde_json::json!(["pending", "in_progress", "completed"])
        );
    }

    #[test]
    fn wire_spellings() {
        assert_eq!(Status::parse("in_progress"), Some(Status::InProgress));
        assert_eq!(Status::parse("In_Progress"), None);
        assert_eq!(
            serde_json::to_string(&Tier::Enterprise).unwrap(),
            "\"enterprise\""
        );
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email(" Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in ["", "a", "@x", "x@", "a b@c", "a@b@c"] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_need_eight_characters() {
        assert!(check_password("password", "1234567").is_err());
        assert!(check_password("password", "12345678").is_ok());
        assert!(check_password("password", &"x".repeat(257)).is_err());
    }
}
