//! The real `psql` client against an in-process server: queries, meta-commands (which run
//! psql's own catalog queries), and `\copy` in text and CSV formats.

use std::path::PathBuf;

use tempfile::TempDir;

use crate::harness::{TestServer, psql};

/// Writes `contents` to a file for psql's `\copy` to read; the file lives as long as the
/// returned directory.
fn input_file(name: &str, contents: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().expect("create a temporary dir");
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("write the input file");
    (dir, path)
}

/// `-A -t -c sql`: unaligned, tuples only, so stdout is just the values.
fn bare(sql: &str) -> [&str; 4] {
    ["-A", "-t", "-c", sql]
}

#[tokio::test]
async fn psql_runs_queries() {
    let server = TestServer::start().await;
    let addr = server.pg_addr();

    assert_eq!(psql(addr, &bare("select 1")).await.ok(), "1\n");

    let version = psql(addr, &bare("SHOW server_version")).await.ok();
    assert!(
        version.trim().starts_with(|c: char| c.is_ascii_digit()),
        "server_version should look like a PostgreSQL version, got {version:?}"
    );

    let version = psql(addr, &bare("select version()")).await.ok();
    assert!(
        version.contains("Weir"),
        "version() should name Weir, got {version:?}"
    );

    // Aligned output, as a person sees it.
    let table = psql(addr, &["-c", "select 1 as a, 'x' as b"]).await.ok();
    assert_eq!(table, " a | b \n---+---\n 1 | x\n(1 row)\n\n");
}

#[tokio::test]
async fn psql_meta_commands_describe_the_catalog() {
    let server = TestServer::start().await;
    let addr = server.pg_addr();
    let create = "create table accounts (id bigint primary key, owner text not null, \
                  balance double precision, active boolean)";
    psql(addr, &["-c", create]).await.ok();

    let tables = psql(addr, &bare(r"\dt")).await.ok();
    assert!(
        tables
            .lines()
            .any(|line| line.split('|').nth(1) == Some("accounts")),
        r"\dt should list accounts, got {tables:?}"
    );

    let columns = psql(addr, &bare(r"\d accounts")).await.ok();
    let described: Vec<(&str, &str)> = columns
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('|');
            Some((fields.next()?, fields.next()?))
        })
        .collect();
    for expected in [
        ("id", "bigint"),
        ("owner", "text"),
        ("balance", "double precision"),
        ("active", "boolean"),
    ] {
        assert!(
            described.contains(&expected),
            r"\d accounts should show {expected:?}, got {columns:?}"
        );
    }

    for command in [r"\l", r"\dn", r"\du", r"\dt+", r"\l+"] {
        let output = psql(addr, &["-c", command]).await;
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{command} failed: {output:#?}"
        );
    }
}

#[tokio::test]
async fn psql_copy_loads_csv_and_text() {
    let server = TestServer::start().await;
    let addr = server.pg_addr();
    psql(
        addr,
        &[
            "-c",
            "create table people (id bigint primary key, name text, age integer)",
        ],
    )
    .await
    .ok();

    let (_csv_dir, csv) = input_file(
        "people.csv",
        "id,name,age\n1,ada,36\n2,\"grace, rear admiral\",85\n3,,\n",
    );
    let copy = format!(
        r"\copy people from '{}' with (format csv, header)",
        csv.display()
    );
    assert_eq!(psql(addr, &["-c", &copy]).await.ok(), "COPY 3\n");

    let (_txt_dir, txt) = input_file("people.txt", "4\tlinus\t\\N\n5\t\\N\t54\n");
    let copy = format!(r"\copy people from '{}'", txt.display());
    assert_eq!(psql(addr, &["-c", &copy]).await.ok(), "COPY 2\n");

    let select = "select id, coalesce(name, '<null>'), coalesce(cast(age as text), '<null>') \
                  from people order by id";
    let rows = psql(addr, &bare(select)).await.ok();
    assert_eq!(
        rows,
        "1|ada|36\n2|grace, rear admiral|85\n3|<null>|<null>\n4|linus|<null>\n5|<null>|54\n"
    );
}

#[tokio::test]
async fn psql_copy_bad_line_names_it_and_loads_nothing() {
    let server = TestServer::start().await;
    let addr = server.pg_addr();
    psql(addr, &["-c", "create table nums (id bigint, label text)"])
        .await
        .ok();

    let (_dir, txt) = input_file("bad.txt", "1\tone\n2\ttwo\nthree\tthree\n4\tfour\n");
    let copy = format!(r"\copy nums from '{}'", txt.display());
    let output = psql(addr, &["-c", &copy]).await;
    assert!(
        !output.status.success(),
        "a bad COPY line should fail: {output:#?}"
    );
    assert!(
        output.stderr.contains("line 3"),
        "the error should name line 3: {output:#?}"
    );

    let count = psql(addr, &bare("select count(*) from nums")).await.ok();
    assert_eq!(count, "0\n", "a failed COPY must load nothing");
}

#[tokio::test]
async fn psql_join_and_group_by() {
    let server = TestServer::start().await;
    let addr = server.pg_addr();
    let setup = [
        "create table authors (id bigint primary key, name text not null)",
        "create table books (id bigint primary key, author_id bigint, pages integer)",
        "insert into authors values (1, 'le guin'), (2, 'lem'), (3, 'tiptree')",
        "insert into books values (10, 1, 300), (11, 1, 250), (12, 2, 200), (13, 2, 400), (14, 2, 100)",
    ];
    let args: Vec<&str> = setup.iter().flat_map(|sql| ["-c", *sql]).collect();
    assert_eq!(
        psql(addr, &args).await.ok(),
        "CREATE TABLE\nCREATE TABLE\nINSERT 0 3\nINSERT 0 5\n"
    );

    let query = "select a.name, count(b.id) as books, coalesce(sum(b.pages), 0) as pages \
                 from authors a left join books b on b.author_id = a.id \
                 group by a.name order by books desc, a.name";
    let rows = psql(addr, &["-A", "-t", "-F", ",", "-c", query]).await.ok();
    assert_eq!(rows, "lem,3,700\nle guin,2,550\ntiptree,0,0\n");
}
