//! Declarative segmentation rules: a TOML file the marketing team reads and edits. Each rule
//! has conditions over a customer's [`Aggregate`] (all must hold) and what a match gives the
//! contact: tags, a lifecycle stage, custom fields.
//!
//! ```toml
//! [[rule]]
//! name = "vip"
//! when = { frequency_gte = 3, monetary_gte = 1000 }
//! tags = ["vip"]
//! stage = "Client"
//! fields = { cf_segment = "vip" }
//! ```
//!
//! Tags are the union of every matching rule's; the stage and each field come from the first
//! matching rule (file order) that sets them. Validation names the line: syntax and unknown
//! keys through the TOML parser, the rest through the spans of the values.
//!
//! TOML rather than YAML: the maintained YAML crates for serde are forks after `serde_yaml`
//! was archived, and TOML's `Spanned` gives the line of every value for free.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use crate::aggregates::Aggregate;

/// The lifecycle stages RD's funnel accepts, lowest first.
pub const STAGES: &[&str] = &["Lead", "Qualified Lead", "Client"];

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}: {message}")]
    Io { path: String, message: String },
    /// The parser's message names line and column.
    #[error("rules file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("rules file {path}, line {line}: {message}")]
    Invalid { path: String, line: usize, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    name: Spanned<String>,
    #[serde(default)]
    when: Option<Spanned<Conditions>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    stage: Option<Spanned<String>>,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<toml::Value>>,
}

/// Conditions of a rule; every one that is set must hold.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    pub frequency_gte: Option<u64>,
    pub frequency_lte: Option<u64>,
    pub monetary_gte: Option<f64>,
    pub monetary_lte: Option<f64>,
    /// Bought within the last N days.
    pub recency_days_lte: Option<u64>,
    /// Last purchase at least N days ago (never matches a customer without purchases).
    pub recency_days_gte: Option<u64>,
    /// Bought any of these SKUs.
    pub sku_any: Option<Vec<String>>,
    /// Bought in any of these store views (codes).
    pub store_any: Option<Vec<String>>,
    /// Lives in any of these regions (state codes, e.g. `SP`).
    pub region_any: Option<Vec<String>>,
    pub country_any: Option<Vec<String>>,
    /// `granted`, `declined` or `unknown`.
    pub consent: Option<String>,
    pub guest: Option<bool>,
}

impl Conditions {
    pub fn matches(&self, a: &Aggregate) -> bool {
        let any = |list: &Option<Vec<String>>, value: Option<&str>| {
            list.as_ref().is_none_or(|l| value.is_some_and(|v| l.iter().any(|x| x.eq_ignore_ascii_case(v))))
        };
        let any_of_set = |list: &Option<Vec<String>>, set: &BTreeSet<String>| {
            list.as_ref().is_none_or(|l| l.iter().any(|x| set.contains(x)))
        };
        self.frequency_gte.is_none_or(|n| a.frequency >= n)
            && self.frequency_lte.is_none_or(|n| a.frequency <= n)
            && self.monetary_gte.is_none_or(|n| a.monetary >= n)
            && self.monetary_lte.is_none_or(|n| a.monetary <= n)
            && self.recency_days_lte.is_none_or(|n| a.recency_days.is_some_and(|d| d <= n))
            && self.recency_days_gte.is_none_or(|n| a.recency_days.is_some_and(|d| d >= n))
            && any_of_set(&self.sku_any, &a.skus)
            && any_of_set(&self.store_any, &a.stores)
            && any(&self.region_any, a.region.as_deref())
            && any(&self.country_any, a.country.as_deref())
            && self.consent.as_ref().is_none_or(|c| *c == a.consent)
            && self.guest.is_none_or(|g| g == a.guest)
    }
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub when: Conditions,
    pub tags: Vec<String>,
    pub stage: Option<String>,
    pub fields: Map<String, Value>,
}

/// A validated rule set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    pub rules: Vec<Rule>,
}

/// What the rules give one customer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    pub tags: BTreeSet<String>,
    pub stage: Option<String>,
    pub fields: Map<String, Value>,
    /// Names of the matching rules.
    pub hits: Vec<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Rules {
    /// A fingerprint of the rule set (FNV-1a over its parsed form): equal rules, equal
    /// fingerprints, whatever the file's layout or comments.
    pub fn fingerprint(&self) -> u64 {
        format!("{self:?}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    }

    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RulesError::Io { path: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|e| RulesError::Syntax {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |span: std::ops::Range<usize>, message: String| RulesError::Invalid {
            path: origin.to_owned(),
            line: line_of(text, span.start),
            message,
        };
        let mut rules = Vec::new();
        let mut names = BTreeSet::new();
        let mut field_types: BTreeMap<String, &'static str> = BTreeMap::new();
        for def in file.rules {
            let name = def.name.get_ref().trim().to_owned();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(invalid(def.name.span(), format!("rule name {name:?} must be letters, digits, _ or -")));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(def.name.span(), format!("rule name {name:?} is used twice")));
            }
            let when = def.when.as_ref().map(|w| w.get_ref().clone()).unwrap_or_default();
            if let (Some(w), Some(consent)) = (&def.when, &when.consent)
                && !matches!(consent.as_str(), "granted" | "declined" | "unknown")
            {
                return Err(invalid(w.span(), format!("consent {consent:?} must be granted, declined or unknown")));
            }
            let mut tags = Vec::new();
            for tag in &def.tags {
                let t = tag.get_ref();
                if t.trim().is_empty() || t.chars().any(char::is_uppercase) {
                    return Err(invalid(
                        tag.span(),
                        format!("tag {t:?} must be non-empty and lower-case (RD refuses capitals)"),
                    ));
                }
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
            let stage = match &def.stage {
                Some(stage) if !STAGES.contains(&stage.get_ref().as_str()) => {
                    return Err(invalid(
                        stage.span(),
                        format!("stage {:?} must be one of {STAGES:?}", stage.get_ref()),
                    ));
                }
                Some(stage) => Some(stage.get_ref().clone()),
                None => None,
            };
            let mut fields = Map::new();
            for (key, value) in &def.fields {
                if !key.starts_with("cf_") || key.len() <= 3 {
                    return Err(invalid(
                        value.span(),
                        format!("field {key:?} must be a custom field (cf_<api_identifier>)"),
                    ));
                }
                let (json, kind) = match value.get_ref() {
                    toml::Value::String(s) => (Value::String(s.clone()), "STRING"),
                    toml::Value::Integer(i) => (Value::from(*i), "INTEGER"),
                    toml::Value::Boolean(b) => (Value::Bool(*b), "BOOLEAN"),
                    _ => {
                        return Err(invalid(
                            value.span(),
                            format!("field {key:?} must be a string, integer or boolean"),
                        ));
                    }
                };
                if let Some(previous) = field_types.insert(key.clone(), kind)
                    && previous != kind
                {
                    return Err(invalid(
                        value.span(),
                        format!("field {key:?} is {previous} in an earlier rule, {kind} here"),
                    ));
                }
                fields.insert(key.clone(), json);
            }
            rules.push(Rule { name, when, tags, stage, fields });
        }
        Ok(Self { rules })
    }

    /// The custom fields the rules write and their RD data types.
    pub fn field_types(&self) -> BTreeMap<String, &'static str> {
        let mut out = BTreeMap::new();
        for rule in &self.rules {
            for (key, value) in &rule.fields {
                let kind = match value {
                    Value::Bool(_) => "BOOLEAN",
                    Value::Number(_) => "INTEGER",
                    _ => "STRING",
                };
                out.entry(key.clone()).or_insert(kind);
            }
        }
        out
    }

    pub fn evaluate(&self, aggregate: &Aggregate) -> Verdict {
        let mut verdict = Verdict::default();
        for rule in self.rules.iter().filter(|r| r.when.matches(aggregate)) {
            verdict.hits.push(rule.name.clone());
            verdict.tags.extend(rule.tags.iter().cloned());
            if verdict.stage.is_none() {
                verdict.stage.clone_from(&rule.stage);
            }
            for (key, value) in &rule.fields {
                verdict.fields.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
[[rule]]
name = "vip"
when = { frequency_gte = 3, monetary_gte = 1000 }
tags = ["vip", "buyer"]
stage = "Client"
fields = { cf_segment = "vip" }

[[rule]]
name = "buyer"
when = { frequency_gte = 1 }
tags = ["buyer"]
stage = "Qualified Lead"
fields = { cf_segment = "buyer", cf_promo = true }

[[rule]]
name = "dormant"
when = { recency_days_gte = 90 }
tags = ["dormant"]
"#;

    fn aggregate(frequency: u64, monetary: f64, recency: Option<u64>) -> Aggregate {
        Aggregate {
            frequency,
            monetary,
            recency_days: recency,
            skus: BTreeSet::new(),
            stores: BTreeSet::new(),
            region: Some("SP".into()),
            country: Some("BR".into()),
            consent: "granted".into(),
            guest: false,
            last_order_id: None,
        }
    }

    #[test]
    fn first_matching_rule_sets_stage_and_fields_tags_accumulate() {
        let rules = Rules::parse(RULES, "rules.toml").unwrap();
        let v = rules.evaluate(&aggregate(4, 1500.0, Some(100)));
        assert_eq!(v.hits, ["vip", "buyer", "dormant"]);
        assert_eq!(v.tags.iter().map(String::as_str).collect::<Vec<_>>(), ["buyer", "dormant", "vip"]);
        assert_eq!(v.stage.as_deref(), Some("Client"));
        assert_eq!(v.fields["cf_segment"], "vip");
        assert_eq!(v.fields["cf_promo"], true);
        let v = rules.evaluate(&aggregate(0, 0.0, None));
        assert!(v.hits.is_empty() && v.stage.is_none() && v.tags.is_empty());
        assert_eq!(rules.field_types()["cf_promo"], "BOOLEAN");
    }

    #[test]
    fn errors_name_the_line() {
        let bad_stage = "[[rule]]\nname = \"a\"\n\nstage = \"Customer\"\n";
        let e = Rules::parse(bad_stage, "r.toml").unwrap_err();
        assert!(matches!(e, RulesError::Invalid { line: 4, .. }), "{e}");
        let bad_tag = "[[rule]]\nname = \"a\"\ntags = [\"ok\",\n  \"VIP\"]\n";
        let e = Rules::parse(bad_tag, "r.toml").unwrap_err();
        assert!(matches!(e, RulesError::Invalid { line: 4, .. }), "{e}");
        let unknown = "[[rule]]\nname = \"a\"\nwhen = { frequency_gt = 1 }\n";
        let e = Rules::parse(unknown, "r.toml").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("frequency_gt"), "{e}");
        let twice = "[[rule]]\nname = \"a\"\n[[rule]]\nname = \"a\"\n";
        assert!(matches!(Rules::parse(twice, "r").unwrap_err(), RulesError::Invalid { line: 4, .. }));
        let field = "[[rule]]\nname = \"a\"\nfields = { segment = \"x\" }\n";
        assert!(matches!(Rules::parse(field, "r").unwrap_err(), RulesError::Invalid { line: 3, .. }));
    }
}
