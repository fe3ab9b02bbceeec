//! The SOQL subset Elo's verification queries need:
//! `SELECT f[, f…] FROM Obj [WHERE cond [AND cond…]] [ORDER BY f [ASC|DESC]] [LIMIT n]`, where a
//! condition is `f = v`, `f != v`, `f < v`, `f <= v`, `f > v`, `f >= v` or `f IN (v, …)`, and a
//! value is a quoted string, a number, `true`/`false`/`null` or a datetime literal.

use serde_json::Value;

use super::model::{SfRecord, parse_datetime};
use super::schema::Schema;

#[derive(Debug, PartialEq)]
pub enum Literal {
    Text(String),
    Number(f64),
    Bool(bool),
    Null,
    DateTime(i64),
}

#[derive(Debug, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

#[derive(Debug, PartialEq)]
pub struct Condition {
    pub field: String,
    pub op: Op,
    pub values: Vec<Literal>,
}

#[derive(Debug, PartialEq)]
pub struct Query {
    pub fields: Vec<String>,
    pub object: String,
    pub conditions: Vec<Condition>,
    pub order_by: Option<(String, bool)>,
    pub limit: Option<usize>,
}

/// A SOQL error, mapped to Salesforce's codes.
#[derive(Debug, PartialEq)]
pub struct SoqlError {
    pub code: &'static str,
    pub message: String,
}

fn malformed(message: impl Into<String>) -> SoqlError {
    SoqlError { code: "MALFORMED_QUERY", message: message.into() }
}

fn tokenize(q: &str) -> Result<Vec<String>, SoqlError> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = q.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut s = String::from("'");
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err(malformed("unterminated string literal"));
            }
            i += 1;
            tokens.push(s);
        } else if "(),".contains(c) {
            tokens.push(c.to_string());
            i += 1;
        } else if "<>=!".contains(c) {
            let mut s = c.to_string();
            if i + 1 < chars.len() && chars[i + 1] == '=' {
                s.push('=');
                i += 1;
            } else if c == '<' && i + 1 < chars.len() && chars[i + 1] == '>' {
                s = "!=".into();
                i += 1;
            }
            tokens.push(s);
            i += 1;
        } else {
            let start = i;
            while i < chars.len() && !chars[i].is_whitespace() && !"(),<>=!'".contains(chars[i]) {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        }
    }
    Ok(tokens)
}

fn literal(token: &str) -> Result<Literal, SoqlError> {
    if let Some(text) = token.strip_prefix('\'') {
        return Ok(Literal::Text(text.to_owned()));
    }
    match token.to_ascii_lowercase().as_str() {
        "true" => return Ok(Literal::Bool(true)),
        "false" => return Ok(Literal::Bool(false)),
        "null" => return Ok(Literal::Null),
        _ => {}
    }
    if let Some(ms) = parse_datetime(token) {
        return Ok(Literal::DateTime(ms));
    }
    token.parse::<f64>().map(Literal::Number).map_err(|_| malformed(format!("unexpected token: '{token}'")))
}

/// Parses a query, checking the object and fields exist.
pub fn parse(q: &str, schema: &Schema) -> Result<Query, SoqlError> {
    let object_exists = |o: &str| schema.object_exists(o);
    let field_exists = |o: &str, f: &str| schema.field(o, f).is_some();
    let tokens = tokenize(q)?;
    let mut pos = 0;
    let kw = |pos: usize, word: &str| tokens.get(pos).is_some_and(|t| t.eq_ignore_ascii_case(word));
    if !kw(0, "SELECT") {
        return Err(malformed("unexpected token: expected SELECT"));
    }
    pos += 1;
    let mut fields = Vec::new();
    while pos < tokens.len() && !kw(pos, "FROM") {
        if tokens[pos] != "," {
            fields.push(tokens[pos].clone());
        }
        pos += 1;
    }
    if fields.is_empty() || !kw(pos, "FROM") {
        return Err(malformed("unexpected token: expected field list and FROM"));
    }
    let object = tokens.get(pos + 1).cloned().ok_or_else(|| malformed("missing object after FROM"))?;
    pos += 2;
    if !object_exists(&object) {
        return Err(SoqlError {
            code: "INVALID_TYPE",
            message: format!(
                "sObject type '{object}' is not supported. If you are attempting to use a custom object, be sure to append the '__c' after the entity name."
            ),
        });
    }
    for f in &fields {
        if !field_exists(&object, f) {
            return Err(SoqlError {
                code: "INVALID_FIELD",
                message: format!("No such column '{f}' on entity '{object}'."),
            });
        }
    }
    let mut conditions = Vec::new();
    if kw(pos, "WHERE") {
        pos += 1;
        loop {
            let field = tokens.get(pos).cloned().ok_or_else(|| malformed("missing condition"))?;
            if !field_exists(&object, &field) {
                return Err(SoqlError {
                    code: "INVALID_FIELD",
                    message: format!("No such column '{field}' on entity '{object}'."),
                });
            }
            let op_token = tokens.get(pos + 1).ok_or_else(|| malformed("missing operator"))?;
            pos += 2;
            let (op, values) = if op_token.eq_ignore_ascii_case("IN") {
                if tokens.get(pos).map(String::as_str) != Some("(") {
                    return Err(malformed("expected ( after IN"));
                }
                pos += 1;
                let mut values = Vec::new();
                while pos < tokens.len() && tokens[pos] != ")" {
                    if tokens[pos] != "," {
                        values.push(literal(&tokens[pos])?);
                    }
                    pos += 1;
                }
                pos += 1;
                (Op::In, values)
            } else {
                let op = match op_token.as_str() {
                    "=" => Op::Eq,
                    "!=" => Op::Ne,
                    "<" => Op::Lt,
                    "<=" => Op::Le,
                    ">" => Op::Gt,
                    ">=" => Op::Ge,
                    other => return Err(malformed(format!("unexpected token: '{other}'"))),
                };
                let value = literal(tokens.get(pos).ok_or_else(|| malformed("missing value"))?)?;
                pos += 1;
                (op, vec![value])
            };
            conditions.push(Condition { field, op, values });
            if kw(pos, "AND") {
                pos += 1;
            } else {
                break;
            }
        }
    }
    let mut order_by = None;
    if kw(pos, "ORDER") && kw(pos + 1, "BY") {
        let field = tokens.get(pos + 2).cloned().ok_or_else(|| malformed("missing ORDER BY field"))?;
        pos += 3;
        let mut ascending = true;
        if kw(pos, "DESC") {
            ascending = false;
            pos += 1;
        } else if kw(pos, "ASC") {
            pos += 1;
        }
        order_by = Some((field, ascending));
    }
    let mut limit = None;
    if kw(pos, "LIMIT") {
        limit = Some(tokens.get(pos + 1).and_then(|t| t.parse().ok()).ok_or_else(|| malformed("invalid LIMIT"))?);
        pos += 2;
    }
    if pos < tokens.len() {
        return Err(malformed(format!("unexpected token: '{}'", tokens[pos])));
    }
    Ok(Query { fields, object, conditions, order_by, limit })
}

/// `ignore_case`: text compares case-insensitively, as SOQL does on all but unique
/// case-sensitive fields ("Comparison operators", SOQL reference).
fn compare(value: Option<&Value>, op: &Op, literal: &Literal, ignore_case: bool) -> bool {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (value, literal) {
        (None | Some(Value::Null), Literal::Null) => Some(Ordering::Equal),
        (None | Some(Value::Null), _) | (_, Literal::Null) => None,
        (Some(Value::String(s)), Literal::Text(t)) if ignore_case => Some(s.to_lowercase().cmp(&t.to_lowercase())),
        (Some(Value::String(s)), Literal::Text(t)) => Some(s.cmp(t)),
        (Some(Value::String(s)), Literal::DateTime(ms)) => parse_datetime(s).map(|v| v.cmp(ms)),
        (Some(Value::Number(n)), Literal::Number(x)) => n.as_f64().and_then(|v| v.partial_cmp(x)),
        (Some(Value::Bool(b)), Literal::Bool(x)) => Some(b.cmp(x)),
        _ => None,
    };
    match (op, ordering) {
        (Op::Ne, None) => matches!(literal, Literal::Null) != value.is_none_or(Value::is_null),
        (_, None) => false,
        (Op::Eq | Op::In, Some(o)) => o == Ordering::Equal,
        (Op::Ne, Some(o)) => o != Ordering::Equal,
        (Op::Lt, Some(o)) => o == Ordering::Less,
        (Op::Le, Some(o)) => o != Ordering::Greater,
        (Op::Gt, Some(o)) => o == Ordering::Greater,
        (Op::Ge, Some(o)) => o != Ordering::Less,
    }
}

/// Runs a parsed query over records.
pub fn run<'a>(query: &Query, records: impl Iterator<Item = &'a SfRecord>, schema: &Schema) -> Vec<&'a SfRecord> {
    let ignore_case: Vec<bool> = query
        .conditions
        .iter()
        .map(|c| c.field != "Id" && schema.field(&query.object, &c.field).is_none_or(|f| f.case_insensitive()))
        .collect();
    let mut rows: Vec<&SfRecord> = records
        .filter(|r| r.object == query.object)
        .filter(|r| {
            query.conditions.iter().zip(&ignore_case).all(|(c, ignore_case)| {
                let value = r.get(&c.field);
                c.values.iter().any(|lit| compare(value.as_ref(), &c.op, lit, *ignore_case))
            })
        })
        .collect();
    if let Some((field, ascending)) = &query.order_by {
        rows.sort_by(|a, b| {
            let key = |r: &SfRecord| r.get(field).map(|v| super::model::scalar_text(&v)).unwrap_or_default();
            let o = key(a).cmp(&key(b));
            if *ascending { o } else { o.reverse() }
        });
    }
    if let Some(limit) = query.limit {
        rows.truncate(limit);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_verification_subset() {
        let q = parse("SELECT Id, Elo_Id__c FROM Account WHERE Elo_Id__c IN ('c:1','c:2') AND LastModifiedDate > 2026-11-01T00:00:00Z ORDER BY LastModifiedDate DESC LIMIT 10", &Schema::default()).unwrap();
        assert_eq!(q.object, "Account");
        assert_eq!(q.fields, vec!["Id", "Elo_Id__c"]);
        assert_eq!(q.conditions.len(), 2);
        assert_eq!(q.conditions[0].values, vec![Literal::Text("c:1".into()), Literal::Text("c:2".into())]);
        assert!(matches!(q.conditions[1].values[0], Literal::DateTime(_)));
        assert_eq!(q.order_by, Some(("LastModifiedDate".into(), false)));
        assert_eq!(q.limit, Some(10));
    }

    #[test]
    fn refuses_what_salesforce_refuses() {
        assert_eq!(parse("SELECT Id FROM Nope", &Schema::default()).unwrap_err().code, "INVALID_TYPE");
        assert_eq!(parse("SELECT Bogus FROM Account", &Schema::default()).unwrap_err().code, "INVALID_FIELD");
        assert_eq!(parse("SELECT Id Account", &Schema::default()).unwrap_err().code, "MALFORMED_QUERY");
        assert_eq!(
            parse("SELECT Id FROM Account WHERE Name = 'x", &Schema::default()).unwrap_err().code,
            "MALFORMED_QUERY"
        );
    }
}
