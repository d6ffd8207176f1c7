//! Hostile input (issue 4, item 9).
//!
//! * Property-based tests on database name validation and identifier quoting: any
//!   string that passes `NameRules` (the default rules, and a permissive configured
//!   pattern `.+`) quotes to exactly one identifier token that stands for exactly
//!   that string — checked with a model of PostgreSQL's lexer for many generated
//!   cases, and against the real PostgreSQL for a bounded number of them.
//! * Valid but tricky names (under `.+`) go through the real server: each creates
//!   exactly one database of exactly that name, and nothing else happens.
//! * Oversized messages and fields are refused.
//! * A corpus of well over 100 hostile names and payloads goes through the real server
//!   in every string field that takes them: each call is refused with
//!   INVALID_ARGUMENT and leaves no trace in PostgreSQL but its `call.refused` row.
mod common;
use common::*;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
};

use db_lifecycle::{
    domain::quote_identifier,
    policy::{NameRules, validate_environment_format, validate_project_format},
    proto::{CreateDatabaseRequest, DeleteDatabaseRequest},
};
use proptest::{
    prelude::*,
    test_runner::{Config as PropConfig, TestRunner},
};
use tonic::{Code, Status};

/// Tests of this binary that create databases, or compare the cluster's list of
/// databases before and after, take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DEFAULT_PATTERN: &str = db_lifecycle::config::DEFAULT_NAME_PATTERN;
const PERMISSIVE_PATTERN: &str = ".+";

fn rules(pattern: &str) -> NameRules {
    NameRules::new(pattern, 63, "a hint").unwrap()
}

static DEFAULT_RULES: LazyLock<NameRules> = LazyLock::new(|| rules(DEFAULT_PATTERN));
static PERMISSIVE_RULES: LazyLock<NameRules> = LazyLock::new(|| rules(PERMISSIVE_PATTERN));

/// A model of PostgreSQL's lexer for one delimited identifier: `"` then any
/// characters with `""` standing for `"`, then `"`. Returns the identifier if `sql`
/// is exactly one such token, None otherwise (unterminated, or text after it).
fn lex_quoted_identifier(sql: &str) -> Option<String> {
    let mut chars = sql.chars();
    if chars.next() != Some('"') {
        return None;
    }
    let mut out = String::new();
    loop {
        match chars.next() {
            None => return None, // unterminated
            Some('"') => {
                let mut rest = chars.clone();
                if rest.next() == Some('"') {
                    out.push('"');
                    chars = rest;
                } else {
                    // End of the token: nothing may follow.
                    return chars.next().is_none().then_some(out);
                }
            }
            Some(c) => out.push(c),
        }
    }
}

/// Strings rich in what breaks SQL, shells, logs and eyes.
fn hostile_string() -> impl Strategy<Value = String> {
    let nasty = prop_oneof![
        Just('"'),
        Just('\''),
        Just(';'),
        Just('-'),
        Just('/'),
        Just('*'),
        Just('\\'),
        Just('$'),
        Just('%'),
        Just('`'),
        Just(' '),
        Just('\0'),
        Just('\n'),
        Just('\u{1b}'),
        Just('\u{7f}'),
        Just('\u{202e}'),
        Just('\u{200d}'),
        Just('\u{200b}'),
        Just('\u{feff}'),
        Just('а'), // Cyrillic a
        Just('é'),
        Just('😀'),
        proptest::char::range('a', 'z'),
        proptest::char::range('0', '9'),
        Just('_'),
    ];
    prop_oneof![
        any::<String>(),
        "[a-z_][a-z0-9_-]{0,70}",
        "[a-zA-Z0-9_\"';/*\\-]{1,70}",
        proptest::collection::vec(nasty, 1..80).prop_map(|v| v.into_iter().collect()),
    ]
}

fn prop_config(cases: u32) -> PropConfig {
    PropConfig {
        cases,
        // Failures are reported in the test output; no files written in the tree.
        failure_persistence: None,
        ..PropConfig::default()
    }
}

/// The hard floor holds under any pattern, and whatever passes quotes to exactly
/// one identifier token that stands for exactly the input.
fn check_name(rules: &NameRules, s: &str) -> Result<(), TestCaseError> {
    match rules.validate(s) {
        Err(e) => {
            prop_assert_eq!(e.code(), Code::InvalidArgument);
        }
        Ok(name) => {
            prop_assert_eq!(name.as_str(), s);
            prop_assert!(!s.is_empty() && s.len() <= 63, "length floor: {:?}", s);
            prop_assert!(
                !s.chars().any(char::is_control),
                "control characters: {:?}",
                s
            );
            let quoted = quote_identifier(s);
            prop_assert_eq!(&name.quoted(), &quoted);
            prop_assert_eq!(lex_quoted_identifier(&quoted), Some(s.to_string()));
            // Quotes inside come in pairs only.
            let inner = &quoted[1..quoted.len() - 1];
            prop_assert_eq!(inner.replace("\"\"", ""), s.replace('"', ""));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(prop_config(4000))]

    #[test]
    fn default_rules_accept_only_plain_names_and_quote_them_to_one_token(s in hostile_string()) {
        let r = &*DEFAULT_RULES;
        check_name(r, &s)?;
        if r.validate(&s).is_ok() {
            prop_assert!(
                s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'),
                "default rules let through {:?}", s
            );
        }
    }

    #[test]
    fn permissive_rules_keep_the_floor_and_quote_to_one_token(s in hostile_string()) {
        check_name(&PERMISSIVE_RULES, &s)?;
    }

    #[test]
    fn quoting_any_string_round_trips_through_the_lexer_model(s in any::<String>()) {
        prop_assert_eq!(lex_quoted_identifier(&quote_identifier(&s)), Some(s));
    }
}

#[test]
fn lexer_model_refuses_broken_tokens() {
    assert_eq!(lex_quoted_identifier(r#""a""b""#), Some(r#"a"b"#.into()));
    assert_eq!(lex_quoted_identifier(r#""a"b""#), None);
    assert_eq!(lex_quoted_identifier(r#""a"; DROP"#), None);
    assert_eq!(lex_quoted_identifier(r#""a"#), None);
    assert_eq!(lex_quoted_identifier("a"), None);
}

/// What PostgreSQL itself makes of `SELECT 1 AS <quoted>` for a string that passed
/// the rules: exactly one statement, one row, one column named exactly `s`.
async fn pg_reads_one_identifier(client: &tokio_postgres::Client, s: &str) -> Result<(), String> {
    use tokio_postgres::SimpleQueryMessage as M;
    let sql = format!("SELECT 1 AS {}", quote_identifier(s));
    let messages = client
        .simple_query(&sql)
        .await
        .map_err(|e| format!("{s:?}: {e}"))?;
    let mut statements = 0;
    let mut columns = Vec::new();
    for m in &messages {
        match m {
            M::CommandComplete(_) => statements += 1,
            M::Row(row) => columns = row.columns().iter().map(|c| c.name().to_string()).collect(),
            _ => {}
        }
    }
    if statements != 1 || columns != [s.to_string()] {
        return Err(format!(
            "{s:?}: {statements} statements, columns {columns:?}"
        ));
    }
    Ok(())
}

/// A bounded number of generated names that passed the permissive rules, run
/// through the real PostgreSQL parser.
#[test]
fn postgres_reads_every_accepted_name_as_one_identifier() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async { cluster().connect("postgres").await.unwrap() });
    let (permissive, default) = (&*PERMISSIVE_RULES, &*DEFAULT_RULES);
    let mut runner = TestRunner::new(prop_config(300));
    let checked = std::cell::Cell::new(0);
    runner
        .run(&hostile_string(), |s| {
            if permissive.validate(&s).is_err() && default.validate(&s).is_err() {
                return Ok(());
            }
            checked.set(checked.get() + 1);
            rt.block_on(pg_reads_one_identifier(&client, &s))
                .map_err(TestCaseError::fail)
        })
        .unwrap();
    let checked = checked.get();
    assert!(
        checked > 100,
        "only {checked} generated names passed the rules"
    );
    // And the hand-picked tricky ones.
    for s in tricky_valid_names("sentinel") {
        rt.block_on(pg_reads_one_identifier(&client, &s)).unwrap();
    }
}

/// Names that pass a permissive pattern (`.+`) but would wreck unquoted SQL.
fn tricky_valid_names(sentinel: &str) -> Vec<String> {
    vec![
        format!("x\"; DROP DATABASE \"{sentinel}\"; --"),
        format!("x'; DROP DATABASE {sentinel}; --"),
        "\"".into(),
        "\"\"".into(),
        "a\"b".into(),
        "'".into(),
        "/* comment".into(),
        "-- comment".into(),
        "Robert'); DROP TABLE students;--".into(),
        "$$ dollar $$".into(),
        "ünïcödé ДБ 数据库 😀".into(),
        "MixedCase".into(),
        " leading and trailing ".into(),
        "%s%n{0}${x}`id`".into(),
        "../../etc/passwd".into(),
        "\\\\".into(),
    ]
}

/// Valid-but-tricky names through the real server with `.+`: each creates exactly one
/// database of exactly that name (and drops it again); nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_valid_names_create_exactly_one_database_of_exactly_that_name() {
    let _turn = SERIAL.lock().await;
    let server = TestServer::start_with(Options {
        extra_toml: format!(
            "[names]\npattern = \"{PERMISSIVE_PATTERN}\"\n\n[approval]\ncreate = \"none\"\ndelete = \"none\"\n"
        ),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let sentinel = unique("hostile_sentinel");
    create_by_hand(&sentinel).await;
    for name in tricky_valid_names(&sentinel) {
        let before = database_names().await;
        let r = agent.create("dev", &name).await.unwrap();
        assert_eq!(r.status, "applied", "{name:?}: {}", r.message);
        assert_eq!(r.database_name, name);
        let after = database_names().await;
        let added: Vec<_> = after.difference(&before).collect();
        assert_eq!(added, vec![&name], "{name:?} created something else");
        assert!(before.is_subset(&after), "{name:?} removed a database");
        assert!(db_exists(&sentinel).await);
        let d = agent.describe("dev", &name).await.unwrap();
        assert!(d.exists && d.owned_by_project, "{name:?}: {}", d.message);

        let r = agent.delete("dev", &name, true).await.unwrap();
        assert_eq!(r.status, "applied", "{name:?}: {}", r.message);
        assert_eq!(database_names().await, before, "{name:?} drop changed more");
    }
    assert_ownership_consistent(&server, &[]).await;
    drop_by_hand(&sentinel).await;
}

/// The cluster's databases, but for the harness's metadata databases (`meta_*`),
/// which other tests of this binary create while a test compares before and after.
async fn database_names() -> BTreeSet<String> {
    target()
        .await
        .query(
            "SELECT datname FROM pg_database WHERE datname NOT LIKE 'meta\\_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ---------- oversized ----------

#[tokio::test]
async fn oversized_messages_and_fields_are_refused() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;

    // A 1 MiB database name: over the server's message limit (64 KiB). tonic itself
    // says OUT_OF_RANGE; the service answers INVALID_ARGUMENT (a malformed request),
    // audited like every refusal.
    let huge = "a".repeat(1 << 20);
    let s = expect_code(agent.create("dev", &huge).await, Code::InvalidArgument);
    assert!(s.message().contains("too large"), "{}", s.message());
    assert!(
        s.message().len() < 1024,
        "the message echoes the whole input"
    );
    assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;

    // Fields too long, in messages under the limit: INVALID_ARGUMENT, audited.
    let long_name = "a".repeat(10 * 1024);
    let s = expect_code(agent.create("dev", &long_name).await, Code::InvalidArgument);
    assert!(s.message().contains("63 bytes"), "{}", s.message());
    assert!(
        s.message().len() < 1024,
        "the message echoes the whole input"
    );
    assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;

    let long_env = "d".repeat(60 * 1024);
    let s = expect_code(
        agent.create(&long_env, "ok_name").await,
        Code::InvalidArgument,
    );
    assert!(
        s.message().len() < 1024,
        "the message echoes the whole input"
    );
    assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;

    let rid = agent
        .create("dev", &unique("hostile_big"))
        .await
        .unwrap()
        .request_id;
    let reason = "r".repeat(10 * 1024);
    let s = expect_code(
        owner.decide(&rid, true, &reason).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("reason"), "{}", s.message());
    assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("requested")
    );

    // Nothing stored for any of them but the one request above; the server serves on.
    assert_eq!(request_count(&server).await, 1);
    agent.describe("dev", "still_fine").await.unwrap();
}

// ---------- the corpus ----------

/// At least 100 hostile names and payloads. None of them passes the default rules.
fn corpus(sentinel: &str) -> Vec<String> {
    let mut c: Vec<String> = vec![
        // SQL injection
        format!("x; DROP DATABASE {sentinel}"),
        format!("x\"; DROP DATABASE \"{sentinel}\"; --"),
        format!("{sentinel}\" WITH (FORCE); --"),
        "'; DROP TABLE project_databases; --".into(),
        "x'); DELETE FROM approval_requests; --".into(),
        "\" OR 1=1 --".into(),
        "1' OR '1'='1".into(),
        "admin'--".into(),
        "' or ''='".into(),
        "x UNION SELECT passwd FROM pg_shadow".into(),
        "x;SELECT pg_sleep(10)".into(),
        "pg_sleep(10)".into(),
        "(SELECT 1)".into(),
        "x::text".into(),
        "x||y".into(),
        "CHR(39)".into(),
        "@@version".into(),
        "x = x".into(),
        "$$x$$".into(),
        "$tag$x$tag$".into(),
        "E'\\x00'".into(),
        "x\\".into(),
        "\\\\".into(),
        "x\\'".into(),
        "COPY x TO PROGRAM 'id'".into(),
        // quotes and comments
        "\"".into(),
        "\"\"".into(),
        "'".into(),
        "''".into(),
        "a\"b".into(),
        "a'b".into(),
        "`x`".into(),
        "--".into(),
        "--x".into(),
        "/**/".into(),
        "x/*".into(),
        "*/x".into(),
        "#".into(),
        "x#y".into(),
        // unicode tricks
        "abc\u{202e}fed".into(),
        "\u{202e}".into(),
        "a\u{202d}b".into(),
        "a\u{2066}b\u{2069}".into(),
        "a\u{200d}b".into(),
        "a\u{200b}b".into(),
        "a\u{200c}b".into(),
        "\u{feff}x".into(),
        "a\u{2060}b".into(),
        "\u{0430}dmin".into(),    // Cyrillic а
        "p\u{03bf}stgres".into(), // Greek ο
        "ｐｏｓｔｇｒｅｓ".into(),
        "ＤＲＯＰ".into(),
        "e\u{0301}".into(),
        "\u{0131}nfo".into(), // dotless i
        "\u{0130}nfo".into(), // dotted capital I
        "\u{fb01}le".into(),  // ligature fi
        "stra\u{00df}e".into(),
        "\u{1d41a}\u{1d41d}\u{1d426}\u{1d422}\u{1d427}".into(), // mathematical bold
        "db\u{1f600}".into(),
        "\u{fffe}".into(),
        "\u{ffff}".into(),
        "\u{e000}".into(),
        "\u{3164}".into(),
        "a\u{00a0}b".into(),
        "a\u{2002}b".into(),
        "a\u{3000}b".into(),
        "a\u{2028}b".into(),
        "a\u{2029}b".into(),
        "a\u{00ad}b".into(),
        "a\u{034f}b".into(),
        "a\u{fe0f}".into(),
        "a\u{e0041}".into(),
        // NUL and control characters
        "\0".into(),
        "a\0b".into(),
        "x\0; DROP DATABASE postgres".into(),
        "x\n".into(),
        "\r\n".into(),
        "a\tb".into(),
        "\u{1b}[31mred".into(),
        "\u{7f}".into(),
        "\u{8}".into(),
        "a\u{85}b".into(),
        "\u{b}".into(),
        "\u{c}".into(),
        // long
        "a".repeat(64),
        "a".repeat(1000),
        "\u{e9}".repeat(32),
        format!("{}\u{e9}", "a".repeat(62)),
        // percent-encoding
        "%41".into(),
        "a%20b".into(),
        "%00".into(),
        "%0a".into(),
        "%25".into(),
        "%27%20OR%201=1".into(),
        "..%2f..%2f".into(),
        // shell metacharacters
        "$(reboot)".into(),
        "`id`".into(),
        "a|b".into(),
        "a&b".into(),
        "a;b".into(),
        "a>b".into(),
        "a<b".into(),
        "$HOME".into(),
        "${IFS}".into(),
        "!x".into(),
        "~root".into(),
        "*".into(),
        "?".into(),
        "a b".into(),
        // format strings and templates
        "%s".into(),
        "%n%n%n".into(),
        "%x%x".into(),
        "{0}".into(),
        "{}".into(),
        "{{7*7}}".into(),
        "${7*7}".into(),
        "<%= 7*7 %>".into(),
        "#{7*7}".into(),
        "${jndi:ldap://x/a}".into(),
        // JSON fragments
        "{\"a\":1}".into(),
        "[]".into(),
        "{".into(),
        "\"}".into(),
        "\",\"project_id\":\"beta\"".into(),
        // path traversal
        "../etc/passwd".into(),
        "..".into(),
        ".".into(),
        "/".into(),
        "./x".into(),
        "..\\..\\windows".into(),
        "/dev/null".into(),
        "C:\\".into(),
        "~/.ssh".into(),
        // markup
        "<script>alert(1)</script>".into(),
        "<img src=x onerror=alert(1)>".into(),
        "javascript:alert(1)".into(),
        "&lt;".into(),
        "*)(uid=*".into(),
        // case and shape
        "Postgres".into(),
        "POSTGRES".into(),
        "Template1".into(),
        "DROP".into(),
        "1abc".into(),
        "0".into(),
        "-1".into(),
        "-x".into(),
        "0x41".into(),
        // whitespace and empty
        "".into(),
        " ".into(),
        "  x".into(),
        "x ".into(),
    ];
    c.dedup();
    c
}

#[derive(Debug)]
struct Refused {
    what: String,
    correlation_id: String,
    message: String,
}

fn refused(what: String, r: Result<impl std::fmt::Debug, Status>) -> Refused {
    match r {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                Code::InvalidArgument,
                "{what}: {:?}: {}",
                s.code(),
                s.message()
            );
            Refused {
                what,
                correlation_id: status_correlation_id(&s),
                message: s.message().to_string(),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_is_refused_with_invalid_argument_and_leaves_only_audit_rows() {
    let _turn = SERIAL.lock().await;
    let sentinel = unique("hostile_sentinel");
    create_by_hand(&sentinel).await;
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let multi = server.as_(&MULTI).await;
    let corpus = corpus(&sentinel);
    assert!(corpus.len() >= 100, "corpus has {} entries", corpus.len());
    let default = &*DEFAULT_RULES;
    for p in &corpus {
        assert!(
            default.validate(p).is_err(),
            "corpus entry {p:?} is a valid name"
        );
    }
    let before = database_names().await;

    let mut calls = Vec::new();
    for p in &corpus {
        // As a database name, in every RPC that takes one.
        calls.push(refused(
            format!("Create name {p:?}"),
            agent.create("dev", p).await,
        ));
        calls.push(refused(
            format!("Create dry-run name {p:?}"),
            agent
                .create_req(CreateDatabaseRequest {
                    environment: "dev".into(),
                    database_name: p.clone(),
                    dry_run: true,
                    ..Default::default()
                })
                .await,
        ));
        calls.push(refused(
            format!("Delete name {p:?}"),
            agent.delete("dev", p, true).await,
        ));
        calls.push(refused(
            format!("Describe name {p:?}"),
            agent.describe("dev", p).await,
        ));
        // As an environment, where it is not a well-formed environment name.
        if validate_environment_format(&p.trim().to_lowercase()).is_err() {
            calls.push(refused(
                format!("Create environment {p:?}"),
                agent.create(p, "fine_name").await,
            ));
        }
        // As a project id (a principal with several projects must name one).
        if !p.trim().is_empty() && validate_project_format(p.trim()).is_err() {
            calls.push(refused(
                format!("Create project {p:?}"),
                multi
                    .create_req(CreateDatabaseRequest {
                        environment: "dev".into(),
                        database_name: "fine_name".into(),
                        project_id: p.clone(),
                        ..Default::default()
                    })
                    .await,
            ));
            calls.push(refused(
                format!("Delete project {p:?}"),
                multi
                    .delete_req(DeleteDatabaseRequest {
                        environment: "dev".into(),
                        database_name: "fine_name".into(),
                        project_id: p.clone(),
                        confirm_delete: true,
                        ..Default::default()
                    })
                    .await,
            ));
        }
        // As a request id.
        calls.push(refused(
            format!("Approve request id {p:?}"),
            owner.approve(p).await,
        ));
        calls.push(refused(
            format!("GetRequest request id {p:?}"),
            owner.get_request(p).await,
        ));
    }

    // One `call.refused` row per call, under its correlation id, saying what the
    // caller was told.
    let meta = server.meta().await;
    let rows: BTreeMap<String, (i64, String, String)> = meta
        .query(
            "SELECT correlation_id, count(*), min(status_code), min(message) FROM flow_events \
             WHERE event_type = 'call.refused' GROUP BY correlation_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    for call in &calls {
        let (n, code, message) = rows
            .get(&call.correlation_id)
            .unwrap_or_else(|| panic!("{}: no call.refused row", call.what));
        assert_eq!(*n, 1, "{}: {n} call.refused rows", call.what);
        assert_eq!(code, "INVALID_ARGUMENT", "{}", call.what);
        assert_eq!(message, &call.message, "{}", call.what);
    }
    assert_eq!(rows.len(), calls.len(), "refusal rows of unknown calls");

    // No other trace: no event but the refusals, no link, no request, no ownership
    // row, no database created or dropped.
    let count = |sql: &'static str| {
        let meta = &meta;
        async move { meta.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM flow_events").await,
        calls.len() as i64,
        "events other than call.refused were recorded"
    );
    assert_eq!(count("SELECT count(*) FROM links").await, 0);
    assert_eq!(count("SELECT count(*) FROM approval_requests").await, 0);
    assert_eq!(count("SELECT count(*) FROM project_databases").await, 0);
    assert_eq!(
        database_names().await,
        before,
        "the cluster's databases changed"
    );
    assert!(db_exists(&sentinel).await);
    for p in &corpus {
        assert!(!before.contains(p), "{p:?} exists as a database");
    }
    // The server is fine after all that.
    agent.describe("dev", "fine_name").await.unwrap();
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    drop_by_hand(&sentinel).await;
    println!("{} hostile calls refused", calls.len());
}

/// Bytes that are not a valid message for the RPC (invalid UTF-8 in a string field,
/// truncated fields, garbage) are refused with INVALID_ARGUMENT without reaching a
/// handler, audited once each, and the server serves on.
#[tokio::test]
async fn malformed_protobuf_is_refused() {
    let server = TestServer::start().await;
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        // database_name (field 2) = 0xff 0xfe: not UTF-8.
        (
            "invalid UTF-8",
            vec![0x0a, 0x03, b'd', b'e', b'v', 0x12, 0x02, 0xff, 0xfe],
        ),
        // a length that runs past the end.
        ("truncated field", vec![0x12, 0x40, b'a']),
        ("garbage", vec![0xff; 16]),
    ];
    for (what, body) in bodies {
        let mut grpc = tonic::client::Grpc::new(server.channel().await);
        grpc.ready().await.unwrap();
        let mut req = tonic::Request::new(body);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", AGENT_A.token).parse().unwrap(),
        );
        let r = grpc
            .unary(
                req,
                http::uri::PathAndQuery::from_static("/dblifecycle.v1.DatabaseLifecycle/Create"),
                RawCodec,
            )
            .await;
        let s = r.expect_err(what);
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "{what}: a malformed request should be INVALID_ARGUMENT: {}",
            s.message()
        );
        assert!(
            s.message().contains("not a valid protobuf message"),
            "{what}: {}",
            s.message()
        );
        let row = assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;
        assert_eq!(row.actor_id, AGENT_A.id, "{what}: {row:?}");
    }
    assert_eq!(request_count(&server).await, 0);
    server
        .as_(&AGENT_A)
        .await
        .describe("dev", "still_fine")
        .await
        .unwrap();
}

/// Clients that connect and send nothing: at most `max_connections` are held, a
/// connection over the cap is closed at once, silent ones are closed after the
/// first-bytes timeout, and the service then serves again by itself.
#[tokio::test]
async fn silent_connections_are_capped_and_closed() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start_with(Options {
        extra_toml: "max_connections = 3\n".into(),
        ..Default::default()
    })
    .await;
    let addr = server.addr.clone();
    let name = unique("silent");
    // Ok(answer), or Err(true) when the call never reached the service (the
    // connection was closed: a connect error, or a status without correlation id).
    let describe = || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|_| true)?;
        let mut client =
            db_lifecycle::proto::database_lifecycle_client::DatabaseLifecycleClient::new(channel);
        let mut request = tonic::Request::new(db_lifecycle::proto::DescribeDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", AGENT_A.token).parse().unwrap(),
        );
        client
            .describe(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.metadata().get("x-correlation-id").is_none())
    };
    // Silent connections fill the slots (the harness's own may still hold one for a
    // moment); once they do, a new client's connection is closed at once and its
    // call fails without reaching the service (no correlation id).
    let mut silent = Vec::new();
    let mut refused = false;
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        if describe().await == Err(true) {
            refused = true;
            break;
        }
    }
    assert!(refused, "a fourth connection was served");
    assert!(server.log().contains("too many open connections"));
    // The silent ones are closed by the service (EOF or reset), without a restart.
    // (The service speaks first, its HTTP/2 settings; read past them to the end.)
    for mut conn in silent {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            let mut buf = [0u8; 256];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was never closed");
    }
    let mut served = None;
    for _ in 0..60 {
        match describe().await {
            Ok(r) => {
                served = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
    assert!(!served.expect("not served again").exists);
}

/// The HTTP/2 client preface.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: with the preface, what a client must send in time.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Waits until the server closes the connection (EOF or reset), reading past
/// whatever it sends first (its HTTP/2 settings); false if still open after `limit`.
async fn closed_by_server(
    conn: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: std::time::Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 256];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok()
}

/// WhoAmI for AGENT_A over `channel`.
async fn who_am_i(
    channel: tonic::transport::Channel,
) -> Result<db_lifecycle::proto::WhoAmIResponse, Status> {
    let mut client =
        db_lifecycle::proto::database_lifecycle_client::DatabaseLifecycleClient::new(channel);
    let mut request = tonic::Request::new(db_lifecycle::proto::WhoAmIRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", AGENT_A.token).parse().unwrap(),
    );
    client.who_am_i(request).await.map(|r| r.into_inner())
}

/// Clients that send one byte and then trickle the HTTP/2 preface a byte a second
/// (never all of it): they can fill the slots, but the handshake deadline counts
/// from accept and is not reset by their bytes, so the server closes them and then
/// serves real calls again by itself.
#[tokio::test]
async fn a_trickle_of_bytes_does_not_hold_connections_past_the_deadline() {
    use tokio::io::AsyncWriteExt;
    const MAX: usize = 6;
    let server = TestServer::start_with(Options {
        extra_toml: format!("max_connections = {MAX}\n"),
        ..Default::default()
    })
    .await;
    // One byte `P` per connection until a real client is refused (the harness's
    // own connection may still hold a slot for a moment).
    let mut trickles = Vec::new();
    let mut refused = false;
    for _ in 0..MAX + 10 {
        let mut conn = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        let _ = conn.write_all(&HTTP2_PREFACE[..1]).await;
        trickles.push(conn);
        if trickles.len() >= MAX && server.health().await.is_none() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the trickling connections never filled the slots");
    assert!(server.log().contains("too many open connections"));

    // Each keeps trickling (up to 20 of the preface's 24 bytes, one a second) until
    // the server closes it.
    let tasks: Vec<_> = trickles
        .into_iter()
        .map(|conn| {
            tokio::spawn(async move {
                let (mut read, mut write) = conn.into_split();
                let trickle = async {
                    for byte in &HTTP2_PREFACE[1..20] {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        if write.write_all(std::slice::from_ref(byte)).await.is_err() {
                            break;
                        }
                    }
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    _ = trickle => unreachable!(),
                    closed = closed_by_server(&mut read, std::time::Duration::from_secs(60)) => closed,
                }
            })
        })
        .collect();
    for task in tasks {
        assert!(
            task.await.unwrap(),
            "a trickling connection was never closed"
        );
    }

    // Real clients are served again, without a restart.
    assert!(
        server
            .wait_health(true, std::time::Duration::from_secs(60))
            .await,
        "health never answered again"
    );
    let who = who_am_i(server.channel().await).await;
    assert_eq!(who.expect("WhoAmI").principal_id, AGENT_A.id);
}

/// A TCP connection to `addr` from the loopback address `source`.
async fn connect_from(source: &str, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(addr.parse().unwrap()).await
}

/// A connection from `source` that sends the HTTP/2 preface and an empty SETTINGS
/// frame, then nothing: Some once the server has answered (its own settings), None
/// when the server closed it instead.
async fn idle_h2_connection(source: &str, addr: &str) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = connect_from(source, addr).await.unwrap();
    // Writing may already fail when the server has closed the connection.
    let _ = conn
        .write_all(&[HTTP2_PREFACE, EMPTY_SETTINGS].concat())
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the server neither answered nor closed the connection");
    match read {
        Ok(n) if n > 0 => Some(conn),
        _ => None,
    }
}

/// A gRPC channel whose connections come from the loopback address `source`.
async fn channel_from(source: &'static str, addr: &str) -> tonic::transport::Channel {
    let target: String = addr.to_string();
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let target = target.clone();
            async move {
                connect_from(source, &target)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect from another peer address")
}

/// One host holding `max_connections_per_peer` idle connections (HTTP/2 preface
/// sent, so past the handshake deadline's reach) gets its next connection closed at
/// once, with a WARN naming it and the limit; another host is served as before, and
/// the host gets its slots back as its connections close.
#[tokio::test]
async fn one_peer_cannot_take_more_than_its_share_of_connections() {
    const PER_PEER: usize = 4;
    let server = TestServer::start_with(Options {
        extra_toml: format!("max_connections = 32\nmax_connections_per_peer = {PER_PEER}\n"),
        ..Default::default()
    })
    .await;
    let addr = server.addr.clone();
    // Hold PER_PEER from 127.0.0.1 (the harness's own connection from there may
    // still hold a slot for a moment; then retry).
    let mut held = Vec::new();
    for _ in 0..100 {
        if held.len() == PER_PEER {
            break;
        }
        match idle_h2_connection("127.0.0.1", &addr).await {
            Some(conn) => held.push(conn),
            None => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert_eq!(
        held.len(),
        PER_PEER,
        "could not open {PER_PEER} connections"
    );

    // The next from 127.0.0.1 is closed at once, and a real call from there fails.
    assert!(
        idle_h2_connection("127.0.0.1", &addr).await.is_none(),
        "a connection over the per-peer cap was served"
    );
    assert_eq!(
        server.health().await,
        None,
        "a call over the cap was served"
    );
    assert!(
        server
            .wait_for_log(
                "too many open connections from this peer",
                std::time::Duration::from_secs(5)
            )
            .await,
        "{}",
        server.log()
    );
    let line = server
        .log()
        .lines()
        .find(|l| l.contains("too many open connections from this peer"))
        .unwrap()
        .to_string();
    assert!(line.contains("127.0.0.1"), "{line}");
    assert!(
        line.contains(&format!("max_connections_per_peer={PER_PEER}")),
        "{line}"
    );

    // Another peer is unaffected: a real call from 127.0.0.2 works, while it holds
    // as many connections as 127.0.0.1.
    let mut others = Vec::new();
    for _ in 1..PER_PEER {
        others.push(
            idle_h2_connection("127.0.0.2", &addr)
                .await
                .expect("127.0.0.2 refused"),
        );
    }
    let who = who_am_i(channel_from("127.0.0.2", &addr).await).await;
    assert_eq!(who.expect("WhoAmI from 127.0.0.2").principal_id, AGENT_A.id);
    drop(others);

    // Closing one of the held connections gives 127.0.0.1 its slot back.
    drop(held.pop());
    let mut served = None;
    for _ in 0..100 {
        served = idle_h2_connection("127.0.0.1", &addr).await;
        if served.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        served.is_some(),
        "the closed connection's slot was not released"
    );
    drop(served);
    drop(held);
    assert!(
        server
            .wait_health(true, std::time::Duration::from_secs(30))
            .await,
        "127.0.0.1 not served after closing its connections"
    );
}
