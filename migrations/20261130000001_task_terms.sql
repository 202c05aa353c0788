-- Search by exact words instead of prefixes. A prefix term (`'<tag>rep':*`) makes the GIN index
-- collect each matching word's entries into a bitmap of its own before the scan can use them;
-- the same words asked for exactly (`'<tag>report' | '<tag>reporting'`) are read straight from
-- their posting lists. At 1 000 000 tasks, for a word in 2 075 of the owner's tasks, the index
-- part of the count took 0.3 ms instead of 0.9-1.0 ms, and pgbench ran 1.28-1.58x the counts per
-- second (the rest is reading each match's heap page). To know which words start with a prefix,
-- each owner's vocabulary is kept here: every word any of its tasks has had. Words are only ever
-- added (a word no task has any more matches nothing, so a stale one costs nothing but a row);
-- they go with the owner.
CREATE TABLE task_terms (
    owner_id  uuid               NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    term      text COLLATE "C"   NOT NULL,
    PRIMARY KEY (owner_id, term)
);

INSERT INTO task_terms (owner_id, term)
SELECT DISTINCT owner_id, term FROM tasks, unnest(tsvector_to_array(search)) AS term
ORDER BY 1, 2
ON CONFLICT DO NOTHING;

-- New words of inserted tasks, once per statement (a bulk insert adds each word once). In a
-- fixed order, so two transactions adding the same new words wait for each other instead of
-- deadlocking.
CREATE FUNCTION task_terms_add_inserted() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_terms (owner_id, term)
    SELECT DISTINCT n.owner_id, term FROM new_tasks AS n, unnest(tsvector_to_array(n.search)) AS term
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_add_terms_on_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION task_terms_add_inserted();

-- New words of an edited title or description (an update that leaves the words alone, such as a
-- status change or a category's ON DELETE SET NULL, does nothing here).
CREATE FUNCTION task_terms_add_updated() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_terms (owner_id, term)
    SELECT NEW.owner_id, term FROM unnest(tsvector_to_array(NEW.search)) AS term
    ORDER BY 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_add_terms_on_update AFTER UPDATE ON tasks
    FOR EACH ROW WHEN (OLD.search IS DISTINCT FROM NEW.search)
    EXECUTE FUNCTION task_terms_add_updated();

-- The owner-tagged query for search words (lower-cased letters and digits, see
-- listing::search_words), every word a prefix and all required, in exact words: each prefix
-- becomes the alternatives of the owner's words that start with it. It matches exactly the
-- tasks `task_search_query(owner, to_tsquery('simple', 'w1:* & w2:*'))` does:
--   - a prefix none of the owner's words starts with matches nothing (the tagged prefix itself,
--     asked for exactly, is no word of the owner's);
--   - a prefix of more than 64 words stays a prefix term;
--   - a word the text-search parser would read differently (not one lexeme equal to itself)
--     falls back to the prefix query as a whole.
CREATE FUNCTION task_search_query_terms(owner uuid, words text[]) RETURNS tsquery
    LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
DECLARE
    tag   text := replace(owner::text, '-', '');
    word  text;
    terms text[];
    parts text[] := '{}';
BEGIN
    FOREACH word IN ARRAY words LOOP
        IF to_tsquery('simple', word || ':*')::text IS DISTINCT FROM '''' || word || ''':*' THEN
            RETURN task_search_query(owner, to_tsquery('simple', array_to_string(words, ':* & ') || ':*'));
        END IF;
        -- Quoted as tsquery lexemes ('' for a quote, \\ for a backslash).
        SELECT array_agg('''' || tag || replace(replace(t.term, '\', '\\'), '''', '''''') || '''')
          INTO terms
          FROM (SELECT term FROM task_terms WHERE owner_id = owner AND term ^@ word LIMIT 65) AS t;
        IF terms IS NULL THEN
            terms := ARRAY['''' || tag || word || ''''];
        ELSIF cardinality(terms) > 64 THEN
            terms := ARRAY['''' || tag || word || ''':*'];
        END IF;
        parts := parts || ('(' || array_to_string(terms, ' | ') || ')');
    END LOOP;
    RETURN array_to_string(parts, ' & ')::tsquery;
END $$;
