//! Magento's `searchCriteria` grammar: filter groups (AND across groups, OR within one),
//! conditions, sort orders, page size and current page, parsed from the query string.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// One filter: `field condition_type value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    pub field: String,
    pub value: String,
    pub condition: String,
}

/// A parsed `searchCriteria`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchCriteria {
    pub groups: Vec<Vec<Filter>>,
    pub sort: Vec<(String, bool)>,
    pub page_size: Option<usize>,
    pub current_page: usize,
}

/// A Magento error: `{"message": "...%1...", "parameters": [...]}` with its HTTP status.
#[derive(Debug, PartialEq)]
pub struct MagentoError {
    pub status: u16,
    pub body: Value,
}

impl MagentoError {
    pub fn new(status: u16, message: &str, parameters: Value) -> Self {
        Self { status, body: json!({"message": message, "parameters": parameters}) }
    }
}

pub const CONDITIONS: &[&str] = &[
    "eq", "neq", "gt", "gteq", "lt", "lteq", "like", "nlike", "in", "nin", "null", "notnull", "from", "to", "finset",
    "nfinset", "moreq",
];

fn decode(s: &str) -> String {
    crate::salesforce::percent_decode(s)
}

/// Parses every `searchCriteria[...]` parameter of a query string.
pub fn parse(query: &str) -> Result<SearchCriteria, MagentoError> {
    let mut filters: BTreeMap<(usize, usize), BTreeMap<String, String>> = BTreeMap::new();
    let mut sorts: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
    let mut criteria = SearchCriteria { current_page: 1, ..SearchCriteria::default() };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key);
        let value = decode(value);
        let Some(rest) = key.strip_prefix("searchCriteria") else { continue };
        let parts: Vec<&str> = rest.trim_start_matches('[').trim_end_matches(']').split("][").collect();
        let index = |s: &str| {
            s.parse::<usize>().map_err(|_| {
                MagentoError::new(
                    400,
                    "\"%fieldName\" is required. Enter and try again.",
                    json!({"fieldName": key.clone()}),
                )
            })
        };
        match parts.as_slice() {
            ["filter_groups" | "filterGroups", g, "filters", f, attr] => {
                filters.entry((index(g)?, index(f)?)).or_default().insert((*attr).to_owned(), value);
            }
            ["sortOrders" | "sort_orders", i, attr] => {
                sorts.entry(index(i)?).or_default().insert((*attr).to_owned(), value);
            }
            ["pageSize" | "page_size"] => criteria.page_size = Some(index(&value)?),
            ["currentPage" | "current_page"] => criteria.current_page = index(&value)?.max(1),
            _ => {}
        }
    }
    let mut groups: BTreeMap<usize, Vec<Filter>> = BTreeMap::new();
    for ((g, _), attrs) in filters {
        let field = attrs.get("field").cloned().ok_or_else(|| {
            MagentoError::new(400, "\"%fieldName\" is required. Enter and try again.", json!({"fieldName": "field"}))
        })?;
        let condition =
            attrs.get("condition_type").or_else(|| attrs.get("conditionType")).cloned().unwrap_or_else(|| "eq".into());
        if !CONDITIONS.contains(&condition.as_str()) {
            return Err(MagentoError::new(400, "Invalid condition type: %1", json!([condition])));
        }
        groups.entry(g).or_default().push(Filter {
            field,
            value: attrs.get("value").cloned().unwrap_or_default(),
            condition,
        });
    }
    criteria.groups = groups.into_values().collect();
    criteria.sort = sorts
        .into_values()
        .filter_map(|s| {
            Some((s.get("field")?.clone(), !s.get("direction").is_some_and(|d| d.eq_ignore_ascii_case("DESC"))))
        })
        .collect();
    Ok(criteria)
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1".into() } else { "0".into() }),
        _ => None,
    }
}

/// Compares like MySQL would for Magento's columns: numerically when both sides are numbers.
fn cmp(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        _ => a.cmp(b),
    }
}

fn like(value: &str, pattern: &str) -> bool {
    let p = pattern.to_lowercase();
    let v = value.to_lowercase();
    let parts: Vec<&str> = p.split('%').collect();
    if parts.len() == 1 {
        return v == p;
    }
    let mut pos = 0;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        match v[pos..].find(part) {
            Some(found) if i > 0 || found == 0 => pos += found + part.len(),
            _ => return false,
        }
    }
    parts.last().is_some_and(|l| l.is_empty()) || v.ends_with(parts.last().expect("non-empty"))
}

/// Whether `item` passes one filter.
pub fn matches(item: &Value, filter: &Filter) -> bool {
    let value = item.get(&filter.field).and_then(as_text);
    let f = filter.value.as_str();
    let list = || f.split(',').map(str::trim).collect::<Vec<_>>();
    match (filter.condition.as_str(), value.as_deref()) {
        ("null", v) => v.is_none(),
        ("notnull", v) => v.is_some(),
        (_, None) => false,
        ("eq", Some(v)) => cmp(v, f).is_eq(),
        ("neq", Some(v)) => !cmp(v, f).is_eq(),
        ("gt", Some(v)) => cmp(v, f).is_gt(),
        ("gteq" | "from" | "moreq", Some(v)) => cmp(v, f).is_ge(),
        ("lt", Some(v)) => cmp(v, f).is_lt(),
        ("lteq" | "to", Some(v)) => cmp(v, f).is_le(),
        ("like", Some(v)) => like(v, f),
        ("nlike", Some(v)) => !like(v, f),
        ("in", Some(v)) => list().iter().any(|x| cmp(v, x).is_eq()),
        ("nin", Some(v)) => !list().iter().any(|x| cmp(v, x).is_eq()),
        ("finset", Some(v)) => v.split(',').any(|x| x.trim() == f),
        ("nfinset", Some(v)) => !v.split(',').any(|x| x.trim() == f),
        _ => false,
    }
}

/// Runs a search: filter, sort, page. `last_page_repeats` reproduces Magento answering a page
/// past the end with the last page again.
pub fn run(items: Vec<Value>, criteria: &SearchCriteria, default_page_size: usize, last_page_repeats: bool) -> Value {
    let mut hits: Vec<Value> = items
        .into_iter()
        .filter(|item| criteria.groups.iter().all(|group| group.iter().any(|f| matches(item, f))))
        .collect();
    for (field, ascending) in criteria.sort.iter().rev() {
        hits.sort_by(|a, b| {
            let (x, y) = (
                a.get(field).and_then(as_text).unwrap_or_default(),
                b.get(field).and_then(as_text).unwrap_or_default(),
            );
            let o = cmp(&x, &y);
            if *ascending { o } else { o.reverse() }
        });
    }
    let total = hits.len();
    let size = criteria.page_size.unwrap_or(default_page_size).max(1);
    let pages = total.div_ceil(size).max(1);
    let page = if last_page_repeats { criteria.current_page.min(pages) } else { criteria.current_page };
    let items: Vec<Value> = hits.into_iter().skip((page - 1).saturating_mul(size)).take(size).collect();
    let groups: Vec<Value> = criteria
        .groups
        .iter()
        .map(|g| json!({"filters": g.iter().map(|f| json!({"field": f.field, "value": f.value, "condition_type": f.condition})).collect::<Vec<_>>()}))
        .collect();
    let mut search = json!({"filter_groups": groups, "current_page": criteria.current_page});
    if let Some(size) = criteria.page_size {
        search["page_size"] = json!(size);
    }
    if !criteria.sort.is_empty() {
        search["sort_orders"] = json!(
            criteria
                .sort
                .iter()
                .map(|(f, asc)| json!({"field": f, "direction": if *asc { "ASC" } else { "DESC" }}))
                .collect::<Vec<_>>()
        );
    }
    json!({"items": items, "search_criteria": search, "total_count": total})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_sorts_and_paging() {
        let q = "searchCriteria[filter_groups][0][filters][0][field]=updated_at&searchCriteria[filter_groups][0][filters][0][value]=2026-11-01%2000:00:00&searchCriteria[filter_groups][0][filters][0][condition_type]=gteq&searchCriteria[filter_groups][1][filters][0][field]=store_id&searchCriteria[filter_groups][1][filters][0][value]=1&searchCriteria[filter_groups][1][filters][1][field]=store_id&searchCriteria[filter_groups][1][filters][1][value]=2&searchCriteria[sortOrders][0][field]=updated_at&searchCriteria[sortOrders][0][direction]=ASC&searchCriteria[pageSize]=50&searchCriteria[currentPage]=3";
        let c = parse(q).unwrap();
        assert_eq!(c.groups.len(), 2);
        assert_eq!(
            c.groups[0][0],
            Filter { field: "updated_at".into(), value: "2026-11-01 00:00:00".into(), condition: "gteq".into() }
        );
        assert_eq!(c.groups[1].len(), 2);
        assert_eq!(c.sort, vec![("updated_at".into(), true)]);
        assert_eq!((c.page_size, c.current_page), (Some(50), 3));
        assert!(parse("searchCriteria[filter_groups][0][filters][0][field]=a&searchCriteria[filter_groups][0][filters][0][condition_type]=around").is_err());
    }

    #[test]
    fn conditions_behave_like_magento() {
        let item = json!({"status": "pending", "grand_total": 120.5, "sku": "MUG-RED", "tags": "a,b"});
        let f = |field: &str, condition: &str, value: &str| {
            matches(&item, &Filter { field: field.into(), value: value.into(), condition: condition.into() })
        };
        assert!(f("grand_total", "gt", "100") && !f("grand_total", "gt", "1000"));
        assert!(f("status", "in", "pending,processing") && f("status", "nin", "complete"));
        assert!(f("sku", "like", "MUG-%") && f("sku", "like", "%red") && !f("sku", "like", "%BLUE%"));
        assert!(f("missing", "null", "") && f("status", "notnull", ""));
        assert!(f("tags", "finset", "b") && f("tags", "nfinset", "c"));
    }
}
