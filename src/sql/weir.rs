//! Weir's own statements (topics, subscriptions, sources, materialized views,
//! `FLUSH`), which PostgreSQL's
//! grammar does not have. They are recognised by their leading words and
//! parsed from sqlparser's tokens; everything else goes to sqlparser.

use std::fmt;

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::types::{SqlState, WeirError, WeirResult};

/// `WITH (key = value, ...)` options, keys lowercased, values as written
/// (strings unquoted).
pub type Options = Vec<(String, String)>;

/// Where a `SEEK` moves a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeekTarget {
    Earliest,
    Latest,
    Offset(u64),
    /// Text of a timestamp, parsed by the engine.
    Timestamp(String),
}

/// A statement in Weir's own grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeirStatement {
    CreateTopic {
        name: String,
        if_not_exists: bool,
        options: Options,
    },
    DropTopic {
        name: String,
        if_exists: bool,
    },
    AlterTopic {
        name: String,
        options: Options,
    },
    ShowTopics,
    CreateSubscription {
        name: String,
        topic: String,
        if_not_exists: bool,
        options: Options,
    },
    DropSubscription {
        name: String,
        if_exists: bool,
    },
    ShowSubscriptions,
    Fetch {
        subscription: String,
        max: u64,
        wait: Option<String>,
    },
    Ack {
        subscription: String,
        lease_ids: Vec<String>,
    },
    Nack {
        subscription: String,
        lease_ids: Vec<String>,
    },
    CommitSubscription {
        subscription: String,
    },
    Seek {
        subscription: String,
        to: SeekTarget,
    },
    /// `CREATE SOURCE name (column defs, WATERMARK FOR col AS expr) WITH (...) FORMAT JSON|CSV`.
    CreateSource {
        name: String,
        if_not_exists: bool,
        /// Column definitions as written (`price BIGINT NOT NULL`), parsed by the engine.
        columns: Vec<String>,
        watermark: Option<WatermarkDef>,
        options: Options,
        /// `JSON` or `CSV`, upper-cased.
        format: String,
    },
    DropSource {
        name: String,
        if_exists: bool,
        cascade: bool,
    },
    ShowSources,
    /// `CREATE SINK name FROM view WITH (...) [FORMAT JSON|CSV]`.
    CreateSink {
        name: String,
        if_not_exists: bool,
        from: String,
        options: Options,
        /// `JSON` or `CSV` for topic sinks, upper-cased; `None` when not written.
        format: Option<String>,
    },
    DropSink {
        name: String,
        if_exists: bool,
    },
    ShowSinks,
    /// `CHECKPOINT`: every dataflow takes a checkpoint now.
    Checkpoint,
    /// `CREATE MATERIALIZED VIEW name AS query [EMIT ON WINDOW CLOSE]`.
    CreateMaterializedView {
        name: String,
        if_not_exists: bool,
        /// The query text as written.
        query: String,
        emit_on_window_close: bool,
    },
    DropMaterializedView {
        name: String,
        if_exists: bool,
        cascade: bool,
    },
    ShowMaterializedViews,
    /// `EXPLAIN CREATE MATERIALIZED VIEW ...`: the dataflow it would run.
    ExplainMaterializedView {
        query: String,
        emit_on_window_close: bool,
    },
    /// Waits until every view reflects every message accepted before it.
    Flush,
}

/// `WATERMARK FOR column AS expression`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkDef {
    pub column: String,
    /// The expression as written, e.g. `ts - INTERVAL '5' SECOND`.
    pub expr: String,
}

fn options_text(options: &Options) -> String {
    if options.is_empty() {
        return String::new();
    }
    let items: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("{k} = '{}'", v.replace('\'', "''")))
        .collect();
    format!(" WITH ({})", items.join(", "))
}

impl fmt::Display for WeirStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeirStatement::CreateTopic {
                name,
                if_not_exists,
                options,
            } => {
                let ine = if *if_not_exists { "IF NOT EXISTS " } else { "" };
                write!(f, "CREATE TOPIC {ine}{name}{}", options_text(options))
            }
            WeirStatement::DropTopic { name, if_exists } => {
                let ie = if *if_exists { "IF EXISTS " } else { "" };
                write!(f, "DROP TOPIC {ie}{name}")
            }
            WeirStatement::AlterTopic { name, options } => {
                let set = options_text(options).replacen(" WITH ", " SET ", 1);
                write!(f, "ALTER TOPIC {name}{set}")
            }
            WeirStatement::ShowTopics => write!(f, "SHOW TOPICS"),
            WeirStatement::CreateSubscription {
                name,
                topic,
                if_not_exists,
                options,
            } => {
                let ine = if *if_not_exists { "IF NOT EXISTS " } else { "" };
                write!(
                    f,
                    "CREATE SUBSCRIPTION {ine}{name} ON TOPIC {topic}{}",
                    options_text(options)
                )
            }
            WeirStatement::DropSubscription { name, if_exists } => {
                let ie = if *if_exists { "IF EXISTS " } else { "" };
                write!(f, "DROP SUBSCRIPTION {ie}{name}")
            }
            WeirStatement::ShowSubscriptions => write!(f, "SHOW SUBSCRIPTIONS"),
            WeirStatement::Fetch {
                subscription,
                max,
                wait,
            } => {
                write!(f, "FETCH {max} FROM SUBSCRIPTION {subscription}")?;
                match wait {
                    Some(w) => write!(f, " WAIT '{w}'"),
                    None => Ok(()),
                }
            }
            WeirStatement::Ack {
                subscription,
                lease_ids,
            } => {
                write!(
                    f,
                    "ACK SUBSCRIPTION {subscription} {}",
                    quoted_list(lease_ids)
                )
            }
            WeirStatement::Nack {
                subscription,
                lease_ids,
            } => {
                write!(
                    f,
                    "NACK SUBSCRIPTION {subscription} {}",
                    quoted_list(lease_ids)
                )
            }
            WeirStatement::CommitSubscription { subscription } => {
                write!(f, "COMMIT SUBSCRIPTION {subscription}")
            }
            WeirStatement::Seek { subscription, to } => {
                let to = match to {
                    SeekTarget::Earliest => "EARLIEST".to_string(),
                    SeekTarget::Latest => "LATEST".to_string(),
                    SeekTarget::Offset(n) => format!("OFFSET {n}"),
                    SeekTarget::Timestamp(t) => format!("TIMESTAMP '{t}'"),
                };
                write!(f, "SEEK SUBSCRIPTION {subscription} TO {to}")
            }
            WeirStatement::CreateSource {
                name,
                if_not_exists,
                columns,
                watermark,
                options,
                format,
            } => {
                let ine = if *if_not_exists { "IF NOT EXISTS " } else { "" };
                let mut items = columns.clone();
                if let Some(w) = watermark {
                    items.push(format!("WATERMARK FOR {} AS {}", w.column, w.expr));
                }
                let cols = if items.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", items.join(", "))
                };
                write!(
                    f,
                    "CREATE SOURCE {ine}{name}{cols}{} FORMAT {format}",
                    options_text(options)
                )
            }
            WeirStatement::DropSource {
                name,
                if_exists,
                cascade,
            } => write!(f, "{}", drop_text("SOURCE", name, *if_exists, *cascade)),
            WeirStatement::ShowSources => write!(f, "SHOW SOURCES"),
            WeirStatement::CreateSink {
                name,
                if_not_exists,
                from,
                options,
                format,
            } => {
                let ine = if *if_not_exists { "IF NOT EXISTS " } else { "" };
                write!(f, "CREATE SINK {ine}{name} FROM {from}")?;
                if !options.is_empty() {
                    let items: Vec<String> = options
                        .iter()
                        .map(|(k, v)| format!("{k} = '{}'", v.replace('\'', "''")))
                        .collect();
                    write!(f, " WITH ({})", items.join(", "))?;
                }
                if let Some(format) = format {
                    write!(f, " FORMAT {format}")?;
                }
                Ok(())
            }
            WeirStatement::DropSink { name, if_exists } => {
                let ie = if *if_exists { "IF EXISTS " } else { "" };
                write!(f, "DROP SINK {ie}{name}")
            }
            WeirStatement::ShowSinks => write!(f, "SHOW SINKS"),
            WeirStatement::Checkpoint => write!(f, "CHECKPOINT"),
            WeirStatement::CreateMaterializedView {
                name,
                if_not_exists,
                query,
                emit_on_window_close,
            } => {
                let ine = if *if_not_exists { "IF NOT EXISTS " } else { "" };
                let emit = emit_text(*emit_on_window_close);
                write!(f, "CREATE MATERIALIZED VIEW {ine}{name} AS {query}{emit}")
            }
            WeirStatement::DropMaterializedView {
                name,
                if_exists,
                cascade,
            } => write!(
                f,
                "{}",
                drop_text("MATERIALIZED VIEW", name, *if_exists, *cascade)
            ),
            WeirStatement::ShowMaterializedViews => write!(f, "SHOW MATERIALIZED VIEWS"),
            WeirStatement::ExplainMaterializedView {
                query,
                emit_on_window_close,
            } => {
                let emit = emit_text(*emit_on_window_close);
                write!(f, "EXPLAIN CREATE MATERIALIZED VIEW v AS {query}{emit}")
            }
            WeirStatement::Flush => write!(f, "FLUSH"),
        }
    }
}

/// `DROP <what> [IF EXISTS] name [CASCADE]`.
fn drop_text(what: &str, name: &str, if_exists: bool, cascade: bool) -> String {
    let ie = if if_exists { "IF EXISTS " } else { "" };
    let c = if cascade { " CASCADE" } else { "" };
    format!("DROP {what} {ie}{name}{c}")
}

fn emit_text(emit_on_window_close: bool) -> &'static str {
    if emit_on_window_close {
        " EMIT ON WINDOW CLOSE"
    } else {
        ""
    }
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("'{}'", i.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a statement's text starts like one of Weir's statements.
pub fn is_weir_statement(text: &str) -> bool {
    let words: Vec<String> = text
        .split_whitespace()
        .take(4)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    matches!(
        (w(0), w(1)),
        ("CREATE" | "DROP" | "ALTER", "TOPIC")
            | ("CREATE" | "DROP", "SUBSCRIPTION")
            | ("SHOW", "TOPICS" | "SUBSCRIPTIONS")
            | ("ACK" | "NACK" | "SEEK", "SUBSCRIPTION")
            | ("COMMIT", "SUBSCRIPTION")
            | ("CREATE" | "DROP", "SOURCE" | "MATERIALIZED")
            | ("SHOW", "SOURCES" | "MATERIALIZED" | "SINKS")
            | ("CREATE" | "DROP", "SINK")
            | ("FLUSH" | "CHECKPOINT", "")
    ) || (w(0) == "FETCH" && (w(2) == "SUBSCRIPTION" || w(3) == "SUBSCRIPTION"))
        || (w(0) == "EXPLAIN" && w(1) == "CREATE" && w(2) == "MATERIALIZED")
}

/// Parses one Weir statement (no trailing `;`).
pub fn parse_weir(text: &str) -> WeirResult<WeirStatement> {
    if let Some(statement) = materialized_view(text)? {
        return Ok(statement);
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize()
        .map_err(|e| syntax(format!("{e}")))?;
    let tokens: Vec<Token> = tokens
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::SemiColon))
        .collect();
    let mut p = Cursor { tokens, pos: 0 };
    let statement = p.statement()?;
    if let Some(extra) = p.peek() {
        return Err(syntax(format!("syntax error at or near \"{extra}\"")));
    }
    Ok(statement)
}

fn syntax(message: impl Into<String>) -> WeirError {
    WeirError::new(SqlState::SYNTAX_ERROR, message)
        .with_hint("see docs/queue.md and docs/sql.md for the statement's form")
}

/// `[EXPLAIN] CREATE MATERIALIZED VIEW [IF NOT EXISTS] name AS query [EMIT ON WINDOW CLOSE]`:
/// the query keeps its text as written (whitespace and comments included), so the engine
/// hands it to sqlparser and DataFusion unchanged. `None` when `text` is another statement.
fn materialized_view(text: &str) -> WeirResult<Option<WeirStatement>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize()
        .map_err(|e| syntax(format!("{e}")))?;
    let significant: Vec<usize> = (0..tokens.len())
        .filter(|&i| !matches!(tokens[i], Token::Whitespace(_) | Token::SemiColon))
        .collect();
    let word = |k: usize, w: &str| -> bool {
        significant.get(k).is_some_and(|&i| {
            matches!(&tokens[i], Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w))
        })
    };
    let explain = word(0, "EXPLAIN");
    let base = usize::from(explain);
    if !(word(base, "CREATE") && word(base + 1, "MATERIALIZED")) {
        return Ok(None);
    }
    if !word(base + 2, "VIEW") {
        return Err(syntax("syntax error: expected CREATE MATERIALIZED VIEW"));
    }
    let mut k = base + 3;
    let if_not_exists = word(k, "IF") && word(k + 1, "NOT") && word(k + 2, "EXISTS");
    if if_not_exists {
        k += 3;
    }
    let name = {
        let sig: Vec<Token> = significant.iter().map(|&i| tokens[i].clone()).collect();
        let mut cursor = Cursor {
            tokens: sig,
            pos: k,
        };
        let name = cursor.name()?;
        k = cursor.pos;
        name
    };
    if !word(k, "AS") {
        return Err(syntax(
            "syntax error in CREATE MATERIALIZED VIEW: expected AS after the view's name",
        ));
    }
    let mut end = significant.len();
    let emit_on_window_close = end >= k + 5
        && word(end - 4, "EMIT")
        && word(end - 3, "ON")
        && word(end - 2, "WINDOW")
        && word(end - 1, "CLOSE");
    if emit_on_window_close {
        end -= 4;
    }
    if end <= k + 1 {
        return Err(syntax(
            "syntax error at end of input: expected a query after AS",
        ));
    }
    let first = significant[k + 1];
    let last = significant[end - 1];
    let query: String = tokens[first..=last].iter().map(|t| t.to_string()).collect();
    Ok(Some(if explain {
        WeirStatement::ExplainMaterializedView {
            query,
            emit_on_window_close,
        }
    } else {
        WeirStatement::CreateMaterializedView {
            name,
            if_not_exists,
            query,
            emit_on_window_close,
        }
    }))
}

struct Cursor {
    tokens: Vec<Token>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn word_is(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.word_is(word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, word: &str) -> WeirResult<()> {
        if self.eat(word) {
            Ok(())
        } else {
            Err(self.unexpected(word))
        }
    }

    fn unexpected(&self, wanted: &str) -> WeirError {
        match self.peek() {
            Some(t) => syntax(format!(
                "syntax error at or near \"{t}\": expected {wanted}"
            )),
            None => syntax(format!("syntax error at end of input: expected {wanted}")),
        }
    }

    /// An identifier: unquoted → lowercase, quoted → as written.
    fn name(&mut self) -> WeirResult<String> {
        match self.peek() {
            Some(Token::Word(w)) if w.quote_style.is_some() => {
                let v = w.value.clone();
                self.pos += 1;
                Ok(v)
            }
            Some(Token::Word(w)) if w.keyword == Keyword::NoKeyword || !is_reserved(&w.value) => {
                let v = w.value.to_lowercase();
                self.pos += 1;
                Ok(v)
            }
            _ => Err(self.unexpected("a name")),
        }
    }

    fn string(&mut self) -> WeirResult<String> {
        match self.next() {
            Some(Token::SingleQuotedString(s)) => Ok(s),
            _ => {
                self.pos -= 1;
                Err(self.unexpected("a quoted string"))
            }
        }
    }

    fn number(&mut self) -> WeirResult<u64> {
        match self.next() {
            Some(Token::Number(n, _)) => n
                .parse()
                .map_err(|_| syntax(format!("\"{n}\" is not a whole number"))),
            _ => {
                self.pos -= 1;
                Err(self.unexpected("a number"))
            }
        }
    }

    fn if_not_exists(&mut self) -> WeirResult<bool> {
        if self.eat("IF") {
            self.expect("NOT")?;
            self.expect("EXISTS")?;
            return Ok(true);
        }
        Ok(false)
    }

    fn if_exists(&mut self) -> WeirResult<bool> {
        if self.eat("IF") {
            self.expect("EXISTS")?;
            return Ok(true);
        }
        Ok(false)
    }

    /// `(k = v, ...)`
    fn option_list(&mut self) -> WeirResult<Options> {
        if self.next() != Some(Token::LParen) {
            self.pos -= 1;
            return Err(self.unexpected("("));
        }
        let mut options = Vec::new();
        loop {
            let key = self.name()?;
            if self.next() != Some(Token::Eq) {
                self.pos -= 1;
                return Err(self.unexpected("="));
            }
            let value = match self.next() {
                Some(Token::SingleQuotedString(s)) => s,
                Some(Token::Number(n, _)) => n,
                Some(Token::Word(w)) => w.value,
                _ => {
                    self.pos -= 1;
                    return Err(self.unexpected("a value"));
                }
            };
            options.push((key, value));
            match self.next() {
                Some(Token::Comma) => continue,
                Some(Token::RParen) => break,
                _ => {
                    self.pos -= 1;
                    return Err(self.unexpected(", or )"));
                }
            }
        }
        Ok(options)
    }

    fn with_options(&mut self) -> WeirResult<Options> {
        if self.eat("WITH") {
            self.option_list()
        } else {
            Ok(Vec::new())
        }
    }

    fn lease_ids(&mut self) -> WeirResult<Vec<String>> {
        let mut ids = vec![self.string()?];
        while self.peek() == Some(&Token::Comma) {
            self.pos += 1;
            ids.push(self.string()?);
        }
        Ok(ids)
    }

    /// `[IF EXISTS] name [CASCADE | RESTRICT]` after `DROP <kind>`; RESTRICT is the default.
    fn drop_target(&mut self) -> WeirResult<(bool, String, bool)> {
        let if_exists = self.if_exists()?;
        let name = self.name()?;
        let cascade = self.eat("CASCADE");
        if !cascade {
            self.eat("RESTRICT");
        }
        Ok((if_exists, name, cascade))
    }

    /// After `CREATE SOURCE`: `[IF NOT EXISTS] name [(defs)] [WITH (...)] [FORMAT f]`.
    fn create_source(&mut self) -> WeirResult<WeirStatement> {
        let if_not_exists = self.if_not_exists()?;
        let name = self.name()?;
        let mut columns = Vec::new();
        let mut watermark = None;
        if self.peek() == Some(&Token::LParen) {
            self.pos += 1;
            let mut item: Vec<Token> = Vec::new();
            let mut depth = 0usize;
            loop {
                let Some(token) = self.next() else {
                    return Err(syntax("syntax error at end of input: expected )"));
                };
                let top_end = depth == 0 && matches!(token, Token::Comma | Token::RParen);
                if top_end {
                    if item.is_empty() {
                        return Err(syntax("syntax error: empty column definition"));
                    }
                    let is_watermark = matches!(&item[0], Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("WATERMARK"));
                    if is_watermark {
                        watermark = Some(watermark_def(&item)?);
                    } else {
                        columns.push(join_tokens(&item));
                    }
                    item.clear();
                    if token == Token::RParen {
                        break;
                    }
                    continue;
                }
                match token {
                    Token::LParen => depth += 1,
                    Token::RParen => depth -= 1,
                    _ => {}
                }
                item.push(token);
            }
        }
        let options = self.with_options()?;
        let format = if self.eat("FORMAT") {
            self.name()?.to_ascii_uppercase()
        } else {
            "JSON".to_string()
        };
        Ok(WeirStatement::CreateSource {
            name,
            if_not_exists,
            columns,
            watermark,
            options,
            format,
        })
    }

    fn statement(&mut self) -> WeirResult<WeirStatement> {
        if self.eat("FLUSH") {
            return Ok(WeirStatement::Flush);
        }
        if self.eat("CHECKPOINT") {
            return Ok(WeirStatement::Checkpoint);
        }
        if self.eat("CREATE") {
            if self.eat("SOURCE") {
                return self.create_source();
            }
            if self.eat("SINK") {
                let if_not_exists = self.if_not_exists()?;
                let name = self.name()?;
                self.expect("FROM")?;
                let from = self.name()?;
                let options = self.with_options()?;
                let format = if self.eat("FORMAT") {
                    Some(self.name()?.to_ascii_uppercase())
                } else {
                    None
                };
                return Ok(WeirStatement::CreateSink {
                    name,
                    if_not_exists,
                    from,
                    options,
                    format,
                });
            }
            if self.eat("TOPIC") {
                let if_not_exists = self.if_not_exists()?;
                let name = self.name()?;
                let options = self.with_options()?;
                return Ok(WeirStatement::CreateTopic {
                    name,
                    if_not_exists,
                    options,
                });
            }
            self.expect("SUBSCRIPTION")?;
            let if_not_exists = self.if_not_exists()?;
            let name = self.name()?;
            self.expect("ON")?;
            self.expect("TOPIC")?;
            let topic = self.name()?;
            let options = self.with_options()?;
            return Ok(WeirStatement::CreateSubscription {
                name,
                topic,
                if_not_exists,
                options,
            });
        }
        if self.eat("DROP") {
            if self.eat("SINK") {
                let if_exists = self.if_exists()?;
                return Ok(WeirStatement::DropSink {
                    if_exists,
                    name: self.name()?,
                });
            }
            if self.eat("SOURCE") {
                let (if_exists, name, cascade) = self.drop_target()?;
                return Ok(WeirStatement::DropSource {
                    name,
                    if_exists,
                    cascade,
                });
            }
            if self.eat("MATERIALIZED") {
                self.expect("VIEW")?;
                let (if_exists, name, cascade) = self.drop_target()?;
                return Ok(WeirStatement::DropMaterializedView {
                    name,
                    if_exists,
                    cascade,
                });
            }
            if self.eat("TOPIC") {
                let if_exists = self.if_exists()?;
                return Ok(WeirStatement::DropTopic {
                    if_exists,
                    name: self.name()?,
                });
            }
            self.expect("SUBSCRIPTION")?;
            let if_exists = self.if_exists()?;
            return Ok(WeirStatement::DropSubscription {
                if_exists,
                name: self.name()?,
            });
        }
        if self.eat("ALTER") {
            self.expect("TOPIC")?;
            let name = self.name()?;
            self.expect("SET")?;
            let options = self.option_list()?;
            return Ok(WeirStatement::AlterTopic { name, options });
        }
        if self.eat("SHOW") {
            if self.eat("SOURCES") {
                return Ok(WeirStatement::ShowSources);
            }
            if self.eat("SINKS") {
                return Ok(WeirStatement::ShowSinks);
            }
            if self.eat("MATERIALIZED") {
                self.expect("VIEWS")?;
                return Ok(WeirStatement::ShowMaterializedViews);
            }
            if self.eat("TOPICS") {
                return Ok(WeirStatement::ShowTopics);
            }
            self.expect("SUBSCRIPTIONS")?;
            return Ok(WeirStatement::ShowSubscriptions);
        }
        if self.eat("FETCH") {
            let max = if matches!(self.peek(), Some(Token::Number(..))) {
                self.number()?
            } else {
                1
            };
            self.expect("FROM")?;
            self.expect("SUBSCRIPTION")?;
            let subscription = self.name()?;
            let wait = if self.eat("WAIT") {
                Some(self.string()?)
            } else {
                None
            };
            return Ok(WeirStatement::Fetch {
                subscription,
                max,
                wait,
            });
        }
        if self.eat("ACK") {
            self.expect("SUBSCRIPTION")?;
            let subscription = self.name()?;
            return Ok(WeirStatement::Ack {
                subscription,
                lease_ids: self.lease_ids()?,
            });
        }
        if self.eat("NACK") {
            self.expect("SUBSCRIPTION")?;
            let subscription = self.name()?;
            return Ok(WeirStatement::Nack {
                subscription,
                lease_ids: self.lease_ids()?,
            });
        }
        if self.eat("COMMIT") {
            self.expect("SUBSCRIPTION")?;
            return Ok(WeirStatement::CommitSubscription {
                subscription: self.name()?,
            });
        }
        self.expect("SEEK")?;
        self.expect("SUBSCRIPTION")?;
        let subscription = self.name()?;
        self.expect("TO")?;
        let to = if self.eat("EARLIEST") {
            SeekTarget::Earliest
        } else if self.eat("LATEST") {
            SeekTarget::Latest
        } else if self.eat("OFFSET") {
            SeekTarget::Offset(self.number()?)
        } else if self.eat("TIMESTAMP") {
            SeekTarget::Timestamp(self.string()?)
        } else {
            return Err(self.unexpected("EARLIEST, LATEST, OFFSET n or TIMESTAMP '...'"));
        };
        Ok(WeirStatement::Seek { subscription, to })
    }
}

/// Tokens back to text, one space between them.
fn join_tokens(tokens: &[Token]) -> String {
    tokens
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `WATERMARK FOR col AS expr` from its tokens.
fn watermark_def(item: &[Token]) -> WeirResult<WatermarkDef> {
    let mut cursor = Cursor {
        tokens: item.to_vec(),
        pos: 1,
    };
    cursor.expect("FOR")?;
    let column = cursor.name()?;
    cursor.expect("AS")?;
    let rest = &item[cursor.pos..];
    if rest.is_empty() {
        return Err(syntax(
            "syntax error in WATERMARK: expected an expression such as ts - INTERVAL '5' SECOND",
        ));
    }
    Ok(WatermarkDef {
        column,
        expr: join_tokens(rest),
    })
}

/// Words that cannot be bare names here.
fn is_reserved(word: &str) -> bool {
    matches!(
        word.to_ascii_uppercase().as_str(),
        "WITH"
            | "ON"
            | "FROM"
            | "TO"
            | "WAIT"
            | "SET"
            | "IF"
            | "TOPIC"
            | "SUBSCRIPTION"
            | "FORMAT"
            | "AS"
            | "CASCADE"
    )
}

/// `'5s'`, `'500ms'`, `'2 min'`, `'7 days'` → milliseconds.
pub fn parse_duration_ms(text: &str) -> WeirResult<u64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad_duration(text))?;
    let factor = match unit.trim() {
        "ms" | "millisecond" | "milliseconds" => 1.0,
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1_000.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000.0,
        "h" | "hour" | "hours" => 3_600_000.0,
        "d" | "day" | "days" => 86_400_000.0,
        _ => return Err(bad_duration(text)),
    };
    Ok((number * factor) as u64)
}

fn bad_duration(text: &str) -> WeirError {
    WeirError::new(
        SqlState::INVALID_PARAMETER_VALUE,
        format!("invalid duration \"{text}\""),
    )
    .with_hint("write a number and a unit, for example '500ms', '30s', '5 min', '7 days'")
}

/// `'128MB'`, `'1 GiB'`, `'4096'` → bytes.
pub fn parse_bytes(text: &str) -> WeirResult<u64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad_bytes(text))?;
    let factor: f64 = match unit.trim() {
        "" | "b" | "bytes" => 1.0,
        "kb" | "kib" | "k" => 1024.0,
        "mb" | "mib" | "m" => 1024.0 * 1024.0,
        "gb" | "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tb" | "tib" | "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad_bytes(text)),
    };
    Ok((number * factor) as u64)
}

fn bad_bytes(text: &str) -> WeirError {
    WeirError::new(
        SqlState::INVALID_PARAMETER_VALUE,
        format!("invalid size \"{text}\""),
    )
    .with_hint("write a number and a unit, for example '64MB' or '1GB'")
}
