-- taskd schema, version 1. Applied migrations are never edited: add a new file instead.

CREATE TABLE users (
    id             uuid        PRIMARY KEY,
    email          text        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254 AND email = lower(email)),
    name           text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    password_hash  text        NOT NULL,
    role           text        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    tier           text        NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'enterprise')),
    -- Bumped whenever outstanding access tokens must stop working (password, role or tier change).
    token_version  integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (email);
CREATE INDEX users_created_at_idx ON users (created_at, id);

CREATE TABLE categories (
    id          uuid        PRIMARY KEY,
    owner_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64),
    color       text        CHECK (color ~ '^#[0-9a-f]{6}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Target of the tasks' composite foreign key: a task may only point at its owner's category.
    CONSTRAINT categories_owner_id_id_key UNIQUE (owner_id, id)
);
-- Names are unique per owner regardless of case; the same index serves the name-ordered listing.
CREATE UNIQUE INDEX categories_owner_name_key ON categories (owner_id, (lower(name) COLLATE "C"));

CREATE TABLE tasks (
    id            uuid        PRIMARY KEY,
    owner_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    category_id   uuid,
    title         text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    description   text        CHECK (char_length(description) <= 10000),
    status        text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'in_progress', 'completed')),
    -- Rank: 0 low, 1 medium, 2 high, 3 urgent; stored as a number so it sorts by rank.
    priority      smallint    NOT NULL DEFAULT 1 CHECK (priority BETWEEN 0 AND 3),
    due_at        timestamptz,
    completed_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Words of title and description, lower-cased, for the `search` filter.
    search        tsvector    GENERATED ALWAYS AS (
                      to_tsvector('simple', title || ' ' || coalesce(description, ''))
                  ) STORED,
    CONSTRAINT tasks_completed_at_check CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    -- Deleting a category keeps its tasks and clears only their category_id (PostgreSQL 15+).
    CONSTRAINT tasks_category_fkey FOREIGN KEY (owner_id, category_id)
        REFERENCES categories (owner_id, id) ON DELETE SET NULL (category_id)
);

-- Every listing reads one owner's tasks (10 000 of them among 1 000 000 in the benchmark,
-- scattered over the whole table), so every index is led by the owner, and plans avoid reading
-- the table for anything but the rows they return: a heap page visit per row is what makes a
-- listing slow. `scripts/bench-list.sh` measures each index's use.
--
-- One index per sort key; the trailing id is the keyset tie-breaker and every index can be
-- walked in both directions.
CREATE INDEX tasks_owner_created_idx  ON tasks (owner_id, created_at, id);
CREATE INDEX tasks_owner_updated_idx  ON tasks (owner_id, updated_at, id);
CREATE INDEX tasks_owner_due_idx      ON tasks (owner_id, (coalesce(due_at, 'infinity'::timestamptz)), id);
CREATE INDEX tasks_owner_priority_idx ON tasks (owner_id, priority, id);
CREATE INDEX tasks_owner_title_idx    ON tasks (owner_id, (lower(title) COLLATE "C"), id);
-- "Most urgent first, then soonest due" (sort=-priority,dueAt; backwards: priority,-dueAt): a
-- mixed-direction sort no single-key index can return in order without sorting a priority's
-- 2 500 rows.
CREATE INDEX tasks_owner_priority_due_idx ON tasks (owner_id, priority DESC, (coalesce(due_at, 'infinity'::timestamptz)), id);
-- Totals of page mode: the filterable columns, so counting an owner's tasks under any status,
-- priority and category filter is an index-only scan. Few distinct values per owner, so B-tree
-- deduplication keeps it tiny (about 8 bytes a task).
CREATE INDEX tasks_owner_filter_idx   ON tasks (owner_id, status, priority, category_id);
-- The categoryId filter, and the foreign key's ON DELETE SET NULL when a category goes.
CREATE INDEX tasks_owner_category_idx ON tasks (owner_id, category_id) WHERE category_id IS NOT NULL;
-- A category belongs to one owner: without this the planner multiplies the two selectivities
-- and expects 50 times too few rows for `owner_id = $1 AND category_id = $2`.
CREATE STATISTICS tasks_owner_category_stats (dependencies) ON owner_id, category_id FROM tasks;

-- Search. A GIN index over the plain words answers "this owner's tasks with a word starting with
-- `rep`" by expanding the prefix into a bitmap of every owner's matches (200 000 rows for a
-- common word among 1 000 000 tasks: 20-90 ms) before keeping this owner's. So the index holds
-- each word prefixed with its owner's id (32 hex digits), and a prefix search reads only that
-- owner's entries: the tagged query matches exactly the owner's words. Queries still test
-- owner_id and `search` themselves: the owner as a plain filter (see store::tasks, which keeps
-- it from pulling in a second index), and `search` for the exact semantics, also the cheap test
-- when a plan walks a sort index instead. (Lexemes of the default parser never contain spaces,
-- so a space can separate them here.)
CREATE FUNCTION task_search_terms(owner uuid, search tsvector) RETURNS tsvector
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN array_to_tsvector(string_to_array(
        replace(owner::text, '-', '') || array_to_string(tsvector_to_array(search), ' ' || replace(owner::text, '-', '')),
        ' '));
-- The same tag put in front of every lexeme of a query (lexemes are quoted, '' escaping a quote).
CREATE FUNCTION task_search_query(owner uuid, query tsquery) RETURNS tsquery
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN regexp_replace(query::text, '''((?:[^'']|'''')*)''', '''' || replace(owner::text, '-', '') || '\1''', 'g')::tsquery;
CREATE INDEX tasks_owner_search_idx   ON tasks USING gin (task_search_terms(owner_id, search));

CREATE TABLE refresh_tokens (
    id          uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- Every token descending from one login shares a family; re-use of a rotated token revokes it.
    family_id   uuid        NOT NULL,
    -- SHA-256 of the token: the token itself is never stored.
    token_hash  bytea       NOT NULL UNIQUE,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);

-- Deployment-wide values every worker must agree on (the generated JWT secret).
CREATE TABLE settings (
    key         text        PRIMARY KEY,
    value       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
