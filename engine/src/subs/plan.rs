//! Query planning: a subscription's SELECT checked for supported shapes and rewritten to return every table's primary key, with one restricted form per table for incremental runs.

use super::*;
use sqlparser::ast::JoinOperator;

/// A subscription's query, rewritten.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// The query with the key columns appended, ORDER BY and LIMIT kept (the initial rows).
    pub(super) ordered_sql: String,
    /// The same without ORDER BY and LIMIT (the whole result).
    pub(super) full_sql: String,
    /// Per table of the FROM clause: its table, key arity, and the query restricted to
    /// changed keys of that table.
    pub(super) aliases: Vec<AliasPlan>,
    /// Columns a client sees (the key columns come after them).
    pub(super) visible: usize,
    /// Total key columns appended.
    pub(super) key_columns: usize,
}

#[derive(Debug, Clone)]
pub(super) struct AliasPlan {
    pub(super) table: String,
    /// Where this alias's key sits among the appended key columns.
    pub(super) key_start: usize,
    pub(super) key_len: usize,
    pub(super) restricted_sql: String,
}

/// Replicated tables and their primary-key columns, in key order.
pub(super) fn replicated_tables(
    conn: &Connection,
) -> Result<BTreeMap<String, Vec<String>>, SubsError> {
    let names: Vec<String> = conn
        .prepare("SELECT name FROM __patina_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = BTreeMap::new();
    for name in names {
        let mut pk: Vec<(i64, String)> = conn
            .prepare("SELECT pk, name FROM pragma_table_info(?1) WHERE pk > 0")?
            .query_map([&name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        pk.sort();
        out.insert(
            name.to_lowercase(),
            pk.into_iter().map(|(_, c)| c).collect(),
        );
    }
    Ok(out)
}

pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(super) fn unquote(part: &str) -> String {
    let t = part.trim();
    let inner = match (t.chars().next(), t.chars().last()) {
        (Some('"'), Some('"')) | (Some('`'), Some('`')) | (Some('['), Some(']'))
            if t.len() >= 2 =>
        {
            &t[1..t.len() - 1]
        }
        _ => t,
    };
    inner.to_string()
}

pub(super) const AGGREGATES: [&str; 8] = [
    "count(",
    "sum(",
    "avg(",
    "min(",
    "max(",
    "total(",
    "group_concat(",
    "string_agg(",
];

/// What makes a result change with no commit, matched in the SQL text lowercased and without
/// spaces: randomness, the clock (date functions without a time value mean now), the
/// connection's own counters.
pub(super) const NONDETERMINISTIC: &[&str] = &[
    "random(",
    "randomblob(",
    "'now'",
    "current_timestamp",
    "current_date",
    "current_time",
    "date()",
    "time()",
    "datetime()",
    "julianday()",
    "unixepoch()",
    "changes(",
    "last_insert_rowid(",
];

/// Rewrites `sql` into a [`Plan`], or says why it cannot be a subscription.
pub(super) fn plan(
    sql: &str,
    tables: &BTreeMap<String, Vec<String>>,
) -> Result<(Plan, String), SubsError> {
    let bad = |m: String| SubsError::BadQuery(m);
    let dialect = SQLiteDialect {};
    let statements =
        Parser::parse_sql(&dialect, sql).map_err(|e| bad(format!("invalid SQL: {e}")))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err(bad("a subscription is exactly one SELECT statement".into()));
    };
    // Every SELECT after the first is a subquery, wherever it sits (a scalar subquery in the
    // WHERE clause, IN (SELECT ..), EXISTS): a commit to its tables changes the result without
    // touching the keys the matcher restricts its passes to, so it cannot be kept exact.
    let selects = sqlparser::tokenizer::Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| bad(format!("invalid SQL: {e}")))?
        .iter()
        .filter(|t| {
            matches!(t, sqlparser::tokenizer::Token::Word(w)
                if w.keyword == sqlparser::keywords::Keyword::SELECT)
        })
        .count();
    if selects > 1 {
        return Err(bad("subqueries are not supported in subscriptions".into()));
    }
    let lowered: String = sql
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if let Some(f) = NONDETERMINISTIC.iter().find(|f| lowered.contains(*f)) {
        return Err(bad(format!(
            "{} is not supported in subscriptions: its value changes without a commit",
            f.trim_end_matches('(').trim_matches('\'')
        )));
    }
    let mut query = (**query).clone();
    if query.with.is_some() {
        return Err(bad("WITH is not supported in subscriptions".into()));
    }
    let normalized = query.to_string();
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(bad(
            "a subscription is one plain SELECT (no UNION, VALUES...)".into(),
        ));
    };
    let grouped = !matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
    if select.distinct.is_some() || grouped || select.having.is_some() {
        return Err(bad(
            "DISTINCT, GROUP BY and HAVING are not supported in subscriptions".into(),
        ));
    }
    for item in &select.projection {
        let text = item.to_string().to_lowercase().replace(' ', "");
        if AGGREGATES.iter().any(|a| text.contains(a)) || text.contains(")over") {
            return Err(bad(format!(
                "aggregate and window functions are not supported in subscriptions: {item}"
            )));
        }
    }
    // The tables of the FROM clause, with the name each is known by in the query.
    let mut factors = Vec::new();
    for from in &select.from {
        factors.push(&from.relation);
        for join in &from.joins {
            // An outer join's rows without a match carry NULL keys, and a match that comes
            // later must delete the row without it, which a pass restricted to the changed
            // keys never sees: its result could not be kept exact.
            if !matches!(
                join.join_operator,
                JoinOperator::Join(_) | JoinOperator::Inner(_) | JoinOperator::CrossJoin(_)
            ) {
                return Err(bad(format!(
                    "only inner joins are supported in subscriptions, not {join}"
                )));
            }
            factors.push(&join.relation);
        }
    }
    if factors.is_empty() {
        return Err(bad("a subscription reads at least one table".into()));
    }
    let mut aliases = Vec::new();
    for factor in factors {
        let TableFactor::Table {
            name, alias, args, ..
        } = factor
        else {
            return Err(bad(format!(
                "only tables can appear in FROM of a subscription, not {factor}"
            )));
        };
        if args.is_some() {
            return Err(bad(format!("table functions are not supported: {factor}")));
        }
        let full = name.to_string();
        let table = unquote(full.rsplit('.').next().unwrap_or(&full));
        let Some(pk) = tables.get(&table.to_lowercase()) else {
            return Err(bad(format!("{table} is not a replicated table")));
        };
        let known_as = alias
            .as_ref()
            .map(|a| a.name.value.clone())
            .unwrap_or_else(|| table.clone());
        aliases.push((table, known_as, pk.clone()));
    }
    // Append every table's key columns to the projection.
    let mut extra = Vec::new();
    let mut key_columns = 0;
    let mut alias_keys = Vec::new();
    for (i, (_, known_as, pk)) in aliases.iter().enumerate() {
        let start = key_columns;
        for (j, col) in pk.iter().enumerate() {
            extra.push(format!(
                "{}.{} AS {}",
                quote(known_as),
                quote(col),
                quote(&format!("__patina_key_{i}_{j}"))
            ));
            key_columns += 1;
        }
        alias_keys.push((start, pk.len()));
    }
    let appended = Parser::parse_sql(&dialect, &format!("SELECT {}", extra.join(", ")))
        .map_err(|e| SubsError::Internal(format!("rewriting: {e}")))?;
    let Some(Statement::Query(appended)) = appended.into_iter().next() else {
        return Err(SubsError::Internal("rewriting: no query".into()));
    };
    let SetExpr::Select(appended) = *appended.body else {
        return Err(SubsError::Internal("rewriting: no select".into()));
    };
    select.projection.extend(appended.projection);
    let ordered_sql = query.to_string();
    query.order_by = None;
    query.limit_clause = None;
    let full_sql = query.to_string();
    let mut plans = Vec::new();
    for (i, (table, known_as, pk)) in aliases.iter().enumerate() {
        let columns: Vec<String> = pk
            .iter()
            .map(|c| format!("{}.{}", quote(known_as), quote(c)))
            .collect();
        let keys: Vec<String> = (0..pk.len()).map(|j| format!("c{j}")).collect();
        let restriction = format!(
            "({}) IN (SELECT {} FROM temp.__patina_keys_{})",
            columns.join(", "),
            keys.join(", "),
            pk.len()
        );
        let restriction = Parser::new(&dialect)
            .try_with_sql(&restriction)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| SubsError::Internal(format!("rewriting: {e}")))?;
        let mut restricted = query.clone();
        let SetExpr::Select(select) = restricted.body.as_mut() else {
            return Err(SubsError::Internal("rewriting: no select".into()));
        };
        select.selection = Some(match select.selection.take() {
            Some(old) => Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(old))),
                op: BinaryOperator::And,
                right: Box::new(restriction),
            },
            None => restriction,
        });
        plans.push(AliasPlan {
            table: table.to_lowercase(),
            key_start: alias_keys[i].0,
            key_len: alias_keys[i].1,
            restricted_sql: restricted.to_string(),
        });
    }
    Ok((
        Plan {
            ordered_sql,
            full_sql,
            aliases: plans,
            visible: 0,
            key_columns,
        },
        normalized,
    ))
}

pub(super) fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn tables() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            ("hosts".to_string(), vec!["id".to_string()]),
            ("kv".to_string(), vec!["k".to_string(), "n".to_string()]),
        ])
    }

    #[test]
    pub(super) fn plans_append_keys_and_restrict_per_table() {
        let (plan, _) = plan(
            "SELECT h.name, kv.v FROM hosts h JOIN kv ON kv.k = h.name WHERE h.id > 3 ORDER BY h.name LIMIT 5",
            &tables(),
        )
        .unwrap();
        assert_eq!(plan.key_columns, 3);
        assert!(plan.ordered_sql.contains("LIMIT 5"), "{}", plan.ordered_sql);
        assert!(!plan.full_sql.contains("LIMIT"), "{}", plan.full_sql);
        assert_eq!(plan.aliases.len(), 2);
        assert!(
            plan.aliases[1].restricted_sql.contains(
                "(\"kv\".\"k\", \"kv\".\"n\") IN (SELECT c0, c1 FROM temp.__patina_keys_2)"
            ),
            "{}",
            plan.aliases[1].restricted_sql
        );
        assert!(
            plan.aliases[0].restricted_sql.contains("(h.id > 3) AND"),
            "{}",
            plan.aliases[0].restricted_sql
        );
    }

    #[test]
    pub(super) fn unsupported_shapes_are_refused_with_a_reason() {
        for (sql, reason) in [
            ("SELEC * FROM hosts", "invalid SQL"),
            (
                "SELECT * FROM hosts; SELECT * FROM kv",
                "exactly one SELECT",
            ),
            ("INSERT INTO hosts VALUES (1)", "exactly one SELECT"),
            ("SELECT count(*) FROM hosts", "aggregate"),
            ("SELECT DISTINCT name FROM hosts", "DISTINCT"),
            ("SELECT name FROM hosts GROUP BY name", "GROUP BY"),
            (
                "SELECT * FROM hosts UNION SELECT * FROM hosts",
                "subqueries",
            ),
            ("SELECT * FROM other", "not a replicated table"),
            ("SELECT * FROM (SELECT * FROM hosts)", "subqueries"),
            ("SELECT 1", "at least one table"),
            (
                "SELECT a.id FROM hosts a WHERE a.id >= (SELECT max(id) FROM hosts)",
                "subqueries",
            ),
            (
                "SELECT id FROM hosts WHERE id IN (SELECT n FROM kv)",
                "subqueries",
            ),
            (
                "SELECT id FROM hosts WHERE EXISTS (select 1 FROM kv)",
                "subqueries",
            ),
            ("SELECT id, random() FROM hosts", "random"),
            (
                "SELECT id FROM hosts WHERE name < CURRENT_TIMESTAMP",
                "current_timestamp",
            ),
            ("SELECT id, unixepoch( ) FROM hosts", "unixepoch"),
            (
                "SELECT id FROM hosts WHERE date('now') > '2020-01-01'",
                "now",
            ),
        ] {
            let err = plan(sql, &tables()).unwrap_err().to_string();
            assert!(err.contains(reason), "{sql}: {err}");
        }
        // Outer joins: a row without a match has NULL keys, and is never deleted when a match
        // comes. Inner joins, written any way, are planned.
        for outer in [
            "LEFT JOIN",
            "LEFT OUTER JOIN",
            "RIGHT JOIN",
            "FULL OUTER JOIN",
        ] {
            let sql = format!("SELECT h.id, kv.v FROM hosts h {outer} kv ON kv.k = h.name");
            let err = plan(&sql, &tables()).unwrap_err().to_string();
            assert!(err.contains("only inner joins"), "{sql}: {err}");
        }
        for inner in ["JOIN", "INNER JOIN", "CROSS JOIN", ","] {
            let on = if inner.contains("JOIN") && inner != "CROSS JOIN" {
                "ON"
            } else {
                "WHERE"
            };
            let sql = format!("SELECT h.id, kv.v FROM hosts h {inner} kv {on} kv.k = h.name");
            plan(&sql, &tables()).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        // The word in a string is not a subquery.
        plan("SELECT id FROM hosts WHERE name = 'SELECT'", &tables()).unwrap();
    }
}
