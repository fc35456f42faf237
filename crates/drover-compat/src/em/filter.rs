//! The query service's `filter` expressions (spec 2.4):
//!
//! ```text
//!  or         := and ( ',' and )*                  ',' is OR
//!  and        := term ( ';' term )*                ';' is AND, binding tighter
//!  term       := '(' or ')' | comparison
//!  comparison := field op value
//!  op         := '==' | '!=' | '<=' | '>=' | '<' | '>'
//!  value      := '"' ( any but '"' | '""' )* '"' | bare characters up to space , ; ( )
//! ```
//!
//! Written by hand as a small recursive descent rather than with a parser generator: the grammar
//! is a dozen lines, and a hand parser reports exactly where it broke (the character position
//! the 400 names) without a dependency whose error messages we would have to translate.
//!
//! The parser recurses once per parenthesis, so nesting is bounded ([`MAX_DEPTH`]) and so is the
//! filter's length ([`MAX_LENGTH`]): a deep filter would otherwise overflow the stack and abort
//! the whole process (all three APIs), and a long one costs time for no real query. Both limits
//! are far above what a script writes and fail with a position like any other syntax error.
//!
//! Parsing is separate from checking: [`parse`] gives the syntax tree, [`compile`] checks field
//! names and values against the queried type's fields (so a bad filter fails even when there is
//! nothing to filter) and turns values into what they are compared as. Enum fields compare by
//! their position in the value list (`Result`: Success < Warning < Failed); text compares without
//! regard to case; date-times compare as instants.

use drover_types::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    /// Positions are 1-based character positions in the filter, for error messages.
    Compare {
        field: String,
        field_at: usize,
        op: Op,
        value: String,
        value_at: usize,
    },
}

/// Where and why a filter is wrong. `position` is 1-based, in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed filter at character {}: {}", self.position, self.message)
    }
}

/// The deepest nesting of parentheses a filter may have.
pub const MAX_DEPTH: usize = 32;
/// The longest filter, in characters.
pub const MAX_LENGTH: usize = 4096;

struct Parser {
    chars: Vec<char>,
    at: usize,
    /// Open parentheses around the current position.
    depth: usize,
}

/// Parses a whole filter.
pub fn parse(input: &str) -> Result<Expr, FilterError> {
    // Counted before collecting, so an over-long filter costs no allocation.
    if let Some((at, _)) = input.char_indices().nth(MAX_LENGTH) {
        let position = input[..at].chars().count() + 1;
        return Err(FilterError { position, message: format!("the filter is longer than {MAX_LENGTH} characters") });
    }
    let mut p = Parser { chars: input.chars().collect(), at: 0, depth: 0 };
    let expr = p.or()?;
    p.skip_spaces();
    match p.peek() {
        None => Ok(expr),
        Some(')') => Err(p.error("')' without a matching '('")),
        Some(c) => Err(p.error(format!("expected ',' or ';' or the end, found {c:?}"))),
    }
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }
    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }
    fn error(&self, message: impl Into<String>) -> FilterError {
        FilterError { position: self.at + 1, message: message.into() }
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.and()?];
        loop {
            self.skip_spaces();
            if self.peek() != Some(',') {
                break;
            }
            self.at += 1;
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { Expr::Or(terms) })
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.term()?];
        loop {
            self.skip_spaces();
            if self.peek() != Some(';') {
                break;
            }
            self.at += 1;
            terms.push(self.term()?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { Expr::And(terms) })
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        self.skip_spaces();
        if self.peek() == Some('(') {
            if self.depth == MAX_DEPTH {
                return Err(self.error(format!("parentheses are nested more than {MAX_DEPTH} deep")));
            }
            self.at += 1;
            self.depth += 1;
            let inner = self.or()?;
            self.depth -= 1;
            self.skip_spaces();
            if self.peek() != Some(')') {
                return Err(self.error("expected ')'"));
            }
            self.at += 1;
            return Ok(inner);
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, FilterError> {
        let field_at = self.at + 1;
        let mut field = String::new();
        while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || *c == '_' || *c == '.') {
            field.push(c);
            self.at += 1;
        }
        if field.is_empty() {
            return Err(match self.peek() {
                None => self.error("expected a field name, found the end"),
                Some(c) => self.error(format!("expected a field name, found {c:?}")),
            });
        }
        self.skip_spaces();
        let op = self.op()?;
        self.skip_spaces();
        let value_at = self.at + 1;
        let value = self.value()?;
        Ok(Expr::Compare { field, field_at, op, value, value_at })
    }

    fn op(&mut self) -> Result<Op, FilterError> {
        let two: String = self.chars.iter().skip(self.at).take(2).collect();
        let (op, len) = match two.as_str() {
            "==" => (Op::Eq, 2),
            "!=" => (Op::Ne, 2),
            "<=" => (Op::Le, 2),
            ">=" => (Op::Ge, 2),
            _ if two.starts_with('<') => (Op::Lt, 1),
            _ if two.starts_with('>') => (Op::Gt, 1),
            _ => return Err(self.error("expected a comparison: ==, !=, <, >, <= or >=")),
        };
        self.at += len;
        Ok(op)
    }

    fn value(&mut self) -> Result<String, FilterError> {
        if self.peek() == Some('"') {
            let open = self.at;
            self.at += 1;
            let mut value = String::new();
            loop {
                match self.peek() {
                    None => {
                        return Err(FilterError {
                            position: open + 1,
                            message: "this quoted string is not closed".into(),
                        });
                    }
                    Some('"') if self.chars.get(self.at + 1) == Some(&'"') => {
                        value.push('"');
                        self.at += 2;
                    }
                    Some('"') => {
                        self.at += 1;
                        return Ok(value);
                    }
                    Some(c) => {
                        value.push(c);
                        self.at += 1;
                    }
                }
            }
        }
        let mut value = String::new();
        while let Some(c) = self.peek().filter(|c| !c.is_whitespace() && !matches!(c, ',' | ';' | '(' | ')' | '"')) {
            value.push(c);
            self.at += 1;
        }
        if value.is_empty() {
            return Err(self.error("expected a value (quote it if it has spaces)"));
        }
        Ok(value)
    }
}

// -------------------------------------------------------------------------------------------------
// Checking against a type's fields, and evaluating

/// What a filterable field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Text,
    Time,
    Number,
    /// Compared by position in this list.
    Enum(&'static [&'static str]),
}

/// A field's value in one record (`None` when absent, e.g. `EndTime` while running).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Time(Timestamp),
    Number(i64),
    Enum(usize),
}

/// A filter checked against a type's fields.
#[derive(Debug, Clone, PartialEq)]
pub enum Compiled {
    Or(Vec<Compiled>),
    And(Vec<Compiled>),
    Compare { field: &'static str, op: Op, value: Value },
}

/// Checks every field name and value of `expr` against `fields`.
pub fn compile(expr: &Expr, fields: &[(&'static str, FieldType)]) -> Result<Compiled, FilterError> {
    Ok(match expr {
        Expr::Or(e) => Compiled::Or(e.iter().map(|e| compile(e, fields)).collect::<Result<_, _>>()?),
        Expr::And(e) => Compiled::And(e.iter().map(|e| compile(e, fields)).collect::<Result<_, _>>()?),
        Expr::Compare { field, field_at, op, value, value_at } => {
            let Some((name, kind)) = fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(field)) else {
                let known: Vec<_> = fields.iter().map(|(n, _)| *n).collect();
                return Err(FilterError {
                    position: *field_at,
                    message: format!("unknown field {field:?}; this type has {}", known.join(", ")),
                });
            };
            let bad = |what: String| FilterError { position: *value_at, message: what };
            let value = match kind {
                FieldType::Text => Value::Text(value.to_lowercase()),
                FieldType::Number => {
                    Value::Number(value.parse().map_err(|_| bad(format!("{name} takes a number, not {value:?}")))?)
                }
                FieldType::Time => Value::Time(parse_time(value).ok_or_else(|| {
                    bad(format!("{name} takes a date-time like 2015-12-07T17:38:16Z, not {value:?}"))
                })?),
                FieldType::Enum(values) => Value::Enum(
                    values
                        .iter()
                        .position(|v| v.eq_ignore_ascii_case(value))
                        .ok_or_else(|| bad(format!("{name} is one of {}, not {value:?}", values.join(", "))))?,
                ),
            };
            Compiled::Compare { field: name, op: *op, value }
        }
    })
}

fn parse_time(s: &str) -> Option<Timestamp> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    let date = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc())
}

impl Compiled {
    /// Whether a record passes; `get` gives a field's value (text lower-cased by the caller or not:
    /// text is compared without regard to case here).
    pub fn matches(&self, get: &dyn Fn(&str) -> Option<Value>) -> bool {
        match self {
            Compiled::Or(e) => e.iter().any(|e| e.matches(get)),
            Compiled::And(e) => e.iter().all(|e| e.matches(get)),
            Compiled::Compare { field, op, value } => {
                let Some(actual) = get(field) else {
                    // An absent value equals nothing: only != holds.
                    return *op == Op::Ne;
                };
                let ordering = match (&actual, value) {
                    (Value::Text(a), Value::Text(b)) => a.to_lowercase().cmp(b),
                    (Value::Time(a), Value::Time(b)) => a.cmp(b),
                    (Value::Number(a), Value::Number(b)) => a.cmp(b),
                    (Value::Enum(a), Value::Enum(b)) => a.cmp(b),
                    _ => return false,
                };
                use std::cmp::Ordering::*;
                match op {
                    Op::Eq => ordering == Equal,
                    Op::Ne => ordering != Equal,
                    Op::Lt => ordering == Less,
                    Op::Gt => ordering == Greater,
                    Op::Le => ordering != Greater,
                    Op::Ge => ordering != Less,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cmp(field: &str, field_at: usize, op: Op, value: &str, value_at: usize) -> Expr {
        Expr::Compare { field: field.into(), field_at, op, value: value.into(), value_at }
    }

    #[test]
    fn and_binds_tighter_than_or_and_parentheses_group() {
        let e = parse("a==1;b!=2,c<3").unwrap();
        assert_eq!(
            e,
            Expr::Or(vec![
                Expr::And(vec![cmp("a", 1, Op::Eq, "1", 4), cmp("b", 6, Op::Ne, "2", 9)]),
                cmp("c", 11, Op::Lt, "3", 13),
            ])
        );
        let e = parse("a>=1;(b<=2,c>3)").unwrap();
        assert_eq!(
            e,
            Expr::And(vec![
                cmp("a", 1, Op::Ge, "1", 4),
                Expr::Or(vec![cmp("b", 7, Op::Le, "2", 10), cmp("c", 12, Op::Gt, "3", 14)]),
            ])
        );
    }

    #[test]
    fn quoted_strings_keep_spaces_and_doubled_quotes() {
        let e = parse(r#"Name == "ABC ""Company"" plan" ; State==Working"#).unwrap();
        let Expr::And(terms) = e else { panic!("{e:?}") };
        assert_eq!(terms[0], cmp("Name", 1, Op::Eq, r#"ABC "Company" plan"#, 9));
    }

    #[test]
    fn errors_name_the_character_where_the_filter_broke() {
        let at = |f: &str| parse(f).unwrap_err().position;
        assert_eq!(at(""), 1);
        assert_eq!(at("Name"), 5);
        assert_eq!(at("Name=x"), 5);
        assert_eq!(at("Name=="), 7);
        assert_eq!(at("(Name==x"), 9);
        assert_eq!(at("Name==x)"), 8);
        assert_eq!(at("Name==\"abc"), 7);
        assert_eq!(at("Name==a b"), 9);
        assert_eq!(at("Name==a;;"), 9);
        assert!(parse("Name==a;").unwrap_err().message.contains("field name"));
    }

    #[test]
    fn nesting_is_limited_before_the_stack_is() {
        let nested = |depth: usize| format!("{}Name==x{}", "(".repeat(depth), ")".repeat(depth));
        assert_eq!(parse(&nested(MAX_DEPTH)).unwrap(), cmp("Name", MAX_DEPTH + 1, Op::Eq, "x", MAX_DEPTH + 7));
        let e = parse(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert_eq!(e.position, MAX_DEPTH + 1, "{e}");
        assert!(e.message.contains("nested more than 32 deep"), "{e}");
        // What took the process down was thousands of parentheses: within the length limit they
        // fail on depth, beyond it on length, closed or not.
        assert!(parse(&nested(2000)).unwrap_err().message.contains("nested more than"));
        assert!(parse(&"(".repeat(2000)).unwrap_err().message.contains("nested more than"));
        assert!(parse(&nested(3000)).unwrap_err().message.contains("longer than"));
        // Depth is nesting, not the number of groups: many groups side by side are fine.
        let wide = vec!["(Name==x)"; 100].join(",");
        assert!(matches!(parse(&wide).unwrap(), Expr::Or(t) if t.len() == 100));
    }

    #[test]
    fn long_filters_are_refused_at_the_first_character_over_the_limit() {
        let at_limit = format!("Name==\"{}\"", "x".repeat(MAX_LENGTH - 8));
        assert_eq!(at_limit.chars().count(), MAX_LENGTH);
        assert!(parse(&at_limit).is_ok());
        let over = format!("Name==\"{}\"", "é".repeat(MAX_LENGTH));
        let e = parse(&over).unwrap_err();
        assert_eq!(e.position, MAX_LENGTH + 1, "{e}");
        assert!(e.to_string().contains("longer than 4096 characters"), "{e}");
    }

    const RESULTS: &[&str] = &["None", "Success", "Warning", "Failed"];
    const FIELDS: &[(&str, FieldType)] = &[
        ("Name", FieldType::Text),
        ("Result", FieldType::Enum(RESULTS)),
        ("CreationTime", FieldType::Time),
        ("Progress", FieldType::Number),
    ];

    #[test]
    fn compile_checks_fields_and_values_with_positions() {
        let err = |f: &str| compile(&parse(f).unwrap(), FIELDS).unwrap_err();
        assert_eq!(err("Name==a;Colour==red").position, 9);
        assert_eq!(err("Result==Great").position, 9);
        assert_eq!(err("CreationTime>yesterday").position, 14);
        assert_eq!(err("Progress>=half").position, 11);
    }

    #[test]
    fn enums_compare_by_position_and_text_without_case() {
        let f = compile(&parse("Result>=Warning,name==\"my PLAN\"").unwrap(), FIELDS).unwrap();
        let record = |result: usize, name: &'static str| {
            move |field: &str| match field {
                "Result" => Some(Value::Enum(result)),
                "Name" => Some(Value::Text(name.into())),
                _ => None,
            }
        };
        assert!(f.matches(&record(3, "x")));
        assert!(f.matches(&record(2, "x")));
        assert!(!f.matches(&record(1, "x")));
        assert!(f.matches(&record(1, "My Plan")));
        let t = compile(&parse("CreationTime>=2015-12-07").unwrap(), FIELDS).unwrap();
        let when = |s: &str| {
            let t = parse_time(s).unwrap();
            move |_: &str| Some(Value::Time(t))
        };
        assert!(t.matches(&when("2015-12-07T17:38:16Z")));
        assert!(!t.matches(&when("2015-12-06T23:59:59Z")));
        let absent = compile(&parse("CreationTime!=2015-12-07").unwrap(), FIELDS).unwrap();
        assert!(absent.matches(&|_: &str| None));
    }

    fn arb_expr() -> impl Strategy<Value = Expr> {
        let leaf = ("[A-Za-z][A-Za-z0-9_]{0,6}", 0..6usize, "[^\"]{0,6}").prop_map(|(field, op, value)| {
            let op = [Op::Eq, Op::Ne, Op::Lt, Op::Gt, Op::Le, Op::Ge][op];
            Expr::Compare { field, field_at: 0, op, value, value_at: 0 }
        });
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::Or),
                proptest::collection::vec(inner, 2..4).prop_map(Expr::And),
            ]
        })
    }

    /// Writes an expression back as filter text, every value quoted (quotes doubled).
    fn unparse(e: &Expr) -> String {
        match e {
            Expr::Or(t) => t.iter().map(|t| format!("({})", unparse(t))).collect::<Vec<_>>().join(","),
            Expr::And(t) => t.iter().map(|t| format!("({})", unparse(t))).collect::<Vec<_>>().join(";"),
            Expr::Compare { field, op, value, .. } => {
                let op = match op {
                    Op::Eq => "==",
                    Op::Ne => "!=",
                    Op::Lt => "<",
                    Op::Gt => ">",
                    Op::Le => "<=",
                    Op::Ge => ">=",
                };
                format!("{field}{op}\"{}\"", value.replace('"', "\"\""))
            }
        }
    }

    fn strip_positions(e: Expr) -> Expr {
        match e {
            Expr::Or(t) => Expr::Or(t.into_iter().map(strip_positions).collect()),
            Expr::And(t) => Expr::And(t.into_iter().map(strip_positions).collect()),
            Expr::Compare { field, op, value, .. } => Expr::Compare { field, field_at: 0, op, value, value_at: 0 },
        }
    }

    proptest! {
        #[test]
        fn written_filters_parse_back_to_themselves(e in arb_expr()) {
            let text = unparse(&e);
            prop_assert_eq!(strip_positions(parse(&text).unwrap()), e);
        }

        #[test]
        fn enum_comparisons_follow_positions_and_connectives_follow_logic(
            record in 0..4usize, a in 0..4usize, b in 0..4usize, c in 0..4usize,
            op_a in 0..6usize, op_b in 0..6usize, op_c in 0..6usize
        ) {
            let ops = [("==", Op::Eq), ("!=", Op::Ne), ("<", Op::Lt), (">", Op::Gt), ("<=", Op::Le), (">=", Op::Ge)];
            let holds = |op: Op, x: usize, y: usize| match op {
                Op::Eq => x == y,
                Op::Ne => x != y,
                Op::Lt => x < y,
                Op::Gt => x > y,
                Op::Le => x <= y,
                Op::Ge => x >= y,
            };
            let get = move |_: &str| Some(Value::Enum(record));
            let left = format!("Result{}{}", ops[op_a].0, RESULTS[a]);
            let right = format!("result {} {}", ops[op_b].0, RESULTS[b].to_uppercase());
            let (l, r) = (holds(ops[op_a].1, record, a), holds(ops[op_b].1, record, b));
            let check = |text: String, expected: bool| -> Result<(), TestCaseError> {
                let f = compile(&parse(&text).unwrap(), FIELDS).unwrap();
                prop_assert_eq!(f.matches(&get), expected, "{}", text);
                Ok(())
            };
            check(left.clone(), l)?;
            check(format!("{left};{right}"), l && r)?;
            check(format!("{left},{right}"), l || r)?;
            // Precedence: `;` binds tighter than `,`, parentheses override it.
            let third = format!("Result{}{}", ops[op_c].0, RESULTS[c]);
            let t = holds(ops[op_c].1, record, c);
            check(format!("{left},{right};{third}"), l || (r && t))?;
            check(format!("({left},{right});{third}"), (l || r) && t)?;
        }

        #[test]
        fn any_input_parses_or_fails_at_a_position_inside_it(s in "[ -~]{0,40}") {
            if let Err(e) = parse(&s) {
                prop_assert!(e.position >= 1 && e.position <= s.chars().count() + 1, "{} for {:?}", e, s);
            }
        }
    }
}
