//! The subset of the Common Expression Language (CEL) that `request-attribute-reporter`
//! expressions are written in, over JSON values.
//!
//! Supported: the declared variables; field selection (`a.b`) and indexing (`a["b"]`); the
//! `has(a.b)` macro; integer (`1`, `1u`), double (`1.5`), string, `true`/`false`/`null`
//! literals; `!` and unary `-`; `* / %`, `+ -` (same-typed operands, as CEL has no implicit
//! numeric conversion); `< <= > >= == !=` (numbers compare across types); `&&` and `||` (an
//! error on one side is absorbed when the other side decides, as CEL does); `c ? a : b`;
//! `int(x)` and `double(x)`. JSON numbers are doubles, as in a `google.protobuf.Struct`.
//! Anything else (macros over lists, other functions) is refused when the expression is
//! compiled, so a config never loads with an expression that cannot run.
//!
//! Compilation is a recursive-descent parse bounded by [`MAX_DEPTH`] nesting levels and
//! [`MAX_TOKENS`] tokens; evaluation walks the tree once, without allocation for numeric
//! expressions.

use std::fmt;

use serde_json::Value as Json;

/// The deepest nesting of parentheses, calls and prefix operators an expression may have.
pub const MAX_DEPTH: usize = 64;

/// The most tokens an expression may have. With it, no compiled tree is deeper than this,
/// so evaluation (which recurses) stays well within a thread's stack.
pub const MAX_TOKENS: usize = 1024;

/// Why an expression does not compile.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at byte {offset})")]
pub struct CompileError {
    message: String,
    offset: usize,
}

/// Why an expression failed on some input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(String);

/// A value an expression computes.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    Uint(u64),
    /// A double.
    Double(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(std::borrow::Cow<'a, str>),
    /// `null`.
    Null,
    /// A JSON object or list from the input.
    Json(&'a Json),
}

/// A compiled expression over the variables it was compiled with.
#[derive(Clone, Debug)]
pub struct Program {
    root: Expr,
}

#[derive(Clone, Debug)]
enum Expr {
    Int(i64),
    Uint(u64),
    Double(f64),
    Bool(bool),
    Str(String),
    Null,
    /// A declared variable, by its position in the compile-time list.
    Variable(usize),
    Select(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Has(Box<Expr>, String),
    ToInt(Box<Expr>),
    ToDouble(Box<Expr>),
    Not(Box<Expr>),
    Negate(Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Conditional(Box<Expr>, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinaryOp {
    Add,
    Subtract,
    Multiply,
    Divide,
    Remainder,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    Equal,
    NotEqual,
}

impl Program {
    /// Compiles `source` over the variables named in `variables`.
    pub fn compile(source: &str, variables: &[&str]) -> Result<Self, CompileError> {
        let tokens = tokenize(source)?;
        if tokens.len() > MAX_TOKENS {
            return Err(CompileError {
                message: format!("longer than {MAX_TOKENS} tokens"),
                offset: tokens[MAX_TOKENS].0,
            });
        }
        let mut parser = Parser { tokens, position: 0, variables, depth: 0 };
        let root = parser.expression()?;
        match parser.peek() {
            None => Ok(Self { root }),
            Some((offset, token)) => Err(CompileError {
                message: format!("unexpected {token} after the expression"),
                offset: *offset,
            }),
        }
    }

    /// Evaluates the expression with `bindings[i]` as the value of the `i`-th variable.
    pub fn eval<'a>(&self, bindings: &'a [Json]) -> Result<Value<'a>, EvalError> {
        eval(&self.root, bindings)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(String),
    Ident(String),
    Punct(&'static str),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Int(value) => write!(f, "'{value}'"),
            Token::Uint(value) => write!(f, "'{value}u'"),
            Token::Double(value) => write!(f, "'{value}'"),
            Token::Str(value) => write!(f, "string {value:?}"),
            Token::Ident(name) => write!(f, "'{name}'"),
            Token::Punct(punct) => write!(f, "'{punct}'"),
        }
    }
}

/// Longest first, so that `<=` is not read as `<` then `=`.
const PUNCTUATION: [&str; 21] = [
    "&&", "||", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "!", "?", ":", "(", ")",
    ".", "[", "]",
];

fn tokenize(source: &str) -> Result<Vec<(usize, Token)>, CompileError> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if byte.is_ascii_whitespace() {
            at += 1;
        } else if byte == b'/' && bytes.get(at + 1) == Some(&b'/') {
            // A comment runs to the end of the line.
            while at < bytes.len() && bytes[at] != b'\n' {
                at += 1;
            }
        } else if byte.is_ascii_digit() {
            let (token, next) = number(source, at)?;
            tokens.push((at, token));
            at = next;
        } else if byte.is_ascii_alphabetic() || byte == b'_' {
            let end = source[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(source.len(), |length| at + length);
            tokens.push((at, Token::Ident(source[at..end].to_owned())));
            at = end;
        } else if byte == b'"' || byte == b'\'' {
            let (text, next) = string(source, at)?;
            tokens.push((at, Token::Str(text)));
            at = next;
        } else if let Some(punct) = PUNCTUATION.iter().find(|p| source[at..].starts_with(**p)) {
            tokens.push((at, Token::Punct(punct)));
            at += punct.len();
        } else {
            let character = source[at..].chars().next().unwrap_or('?');
            return Err(CompileError {
                message: format!("unexpected character {character:?}"),
                offset: at,
            });
        }
    }
    Ok(tokens)
}

fn number(source: &str, start: usize) -> Result<(Token, usize), CompileError> {
    let bytes = source.as_bytes();
    let mut end = start;
    while end < bytes.len() && bytes[end].is_ascii_digit() {
        end += 1;
    }
    let mut is_double = false;
    if end + 1 < bytes.len() && bytes[end] == b'.' && bytes[end + 1].is_ascii_digit() {
        is_double = true;
        end += 1;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
    }
    if end < bytes.len() && (bytes[end] == b'e' || bytes[end] == b'E') {
        let mut exponent = end + 1;
        if exponent < bytes.len() && (bytes[exponent] == b'+' || bytes[exponent] == b'-') {
            exponent += 1;
        }
        if exponent < bytes.len() && bytes[exponent].is_ascii_digit() {
            is_double = true;
            end = exponent;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
        }
    }
    let text = &source[start..end];
    let invalid = |_| CompileError { message: format!("invalid number '{text}'"), offset: start };
    if is_double {
        return Ok((Token::Double(text.parse().map_err(|_| invalid(()))?), end));
    }
    if bytes.get(end).is_some_and(|b| *b == b'u' || *b == b'U') {
        return Ok((Token::Uint(text.parse().map_err(|_| invalid(()))?), end + 1));
    }
    Ok((Token::Int(text.parse().map_err(|_| invalid(()))?), end))
}

fn string(source: &str, start: usize) -> Result<(String, usize), CompileError> {
    let quote = source.as_bytes()[start] as char;
    let mut text = String::new();
    let mut characters = source[start + 1..].char_indices();
    while let Some((offset, character)) = characters.next() {
        match character {
            c if c == quote => return Ok((text, start + 1 + offset + 1)),
            '\\' => match characters.next() {
                Some((_, 'n')) => text.push('\n'),
                Some((_, 't')) => text.push('\t'),
                Some((_, escaped @ ('\\' | '"' | '\''))) => text.push(escaped),
                _ => {
                    return Err(CompileError {
                        message: "unsupported escape in string".into(),
                        offset: start + 1 + offset,
                    });
                }
            },
            '\n' => break,
            c => text.push(c),
        }
    }
    Err(CompileError { message: "unterminated string".into(), offset: start })
}

struct Parser<'s> {
    tokens: Vec<(usize, Token)>,
    position: usize,
    variables: &'s [&'s str],
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&(usize, Token)> {
        self.tokens.get(self.position)
    }

    fn offset(&self) -> usize {
        self.peek().map_or_else(|| self.tokens.last().map_or(0, |(at, _)| *at), |(at, _)| *at)
    }

    fn error(&self, message: impl Into<String>) -> CompileError {
        CompileError { message: message.into(), offset: self.offset() }
    }

    fn eat(&mut self, punct: &str) -> bool {
        if matches!(self.peek(), Some((_, Token::Punct(p))) if *p == punct) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, punct: &str) -> Result<(), CompileError> {
        if self.eat(punct) {
            return Ok(());
        }
        Err(match self.peek() {
            Some((_, token)) => self.error(format!("expected '{punct}', found {token}")),
            None => self.error(format!("expected '{punct}' at the end")),
        })
    }

    fn descend(&mut self) -> Result<(), CompileError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn expression(&mut self) -> Result<Expr, CompileError> {
        self.descend()?;
        let condition = self.or()?;
        let result = if self.eat("?") {
            let then = self.expression()?;
            self.expect(":")?;
            let otherwise = self.expression()?;
            Expr::Conditional(Box::new(condition), Box::new(then), Box::new(otherwise))
        } else {
            condition
        };
        self.depth -= 1;
        Ok(result)
    }

    fn or(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.relation()?;
        while self.eat("&&") {
            left = Expr::And(Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.sum()?;
        loop {
            let op = match self.peek() {
                Some((_, Token::Punct("<"))) => BinaryOp::Less,
                Some((_, Token::Punct("<="))) => BinaryOp::LessOrEqual,
                Some((_, Token::Punct(">"))) => BinaryOp::Greater,
                Some((_, Token::Punct(">="))) => BinaryOp::GreaterOrEqual,
                Some((_, Token::Punct("=="))) => BinaryOp::Equal,
                Some((_, Token::Punct("!="))) => BinaryOp::NotEqual,
                _ => return Ok(left),
            };
            self.position += 1;
            left = Expr::Binary(op, Box::new(left), Box::new(self.sum()?));
        }
    }

    fn sum(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.product()?;
        loop {
            let op = match self.peek() {
                Some((_, Token::Punct("+"))) => BinaryOp::Add,
                Some((_, Token::Punct("-"))) => BinaryOp::Subtract,
                _ => return Ok(left),
            };
            self.position += 1;
            left = Expr::Binary(op, Box::new(left), Box::new(self.product()?));
        }
    }

    fn product(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek() {
                Some((_, Token::Punct("*"))) => BinaryOp::Multiply,
                Some((_, Token::Punct("/"))) => BinaryOp::Divide,
                Some((_, Token::Punct("%"))) => BinaryOp::Remainder,
                _ => return Ok(left),
            };
            self.position += 1;
            left = Expr::Binary(op, Box::new(left), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, CompileError> {
        if self.eat("!") {
            self.descend()?;
            let operand = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(operand)));
        }
        if self.eat("-") {
            // A negative literal is one token in CEL, so `-9223372036854775808` fits.
            if let Some((_, Token::Int(_) | Token::Double(_))) = self.peek() {
                return match self.tokens[self.position].1.clone() {
                    Token::Int(value) => {
                        self.position += 1;
                        Ok(self.member(Expr::Int(-value))?)
                    }
                    Token::Double(value) => {
                        self.position += 1;
                        Ok(self.member(Expr::Double(-value))?)
                    }
                    _ => Err(self.error("expected a number")),
                };
            }
            self.descend()?;
            let operand = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Negate(Box::new(operand)));
        }
        let primary = self.primary()?;
        self.member(primary)
    }

    fn member(&mut self, mut target: Expr) -> Result<Expr, CompileError> {
        loop {
            if self.eat(".") {
                let field = self.identifier()?;
                if matches!(self.peek(), Some((_, Token::Punct("(")))) {
                    return Err(self.error(format!("unsupported method '{field}'")));
                }
                target = Expr::Select(Box::new(target), field);
            } else if self.eat("[") {
                let index = self.expression()?;
                self.expect("]")?;
                target = Expr::Index(Box::new(target), Box::new(index));
            } else {
                return Ok(target);
            }
        }
    }

    fn identifier(&mut self) -> Result<String, CompileError> {
        match self.peek() {
            Some((_, Token::Ident(name))) => {
                let name = name.clone();
                self.position += 1;
                Ok(name)
            }
            Some((_, token)) => Err(self.error(format!("expected a field name, found {token}"))),
            None => Err(self.error("expected a field name at the end")),
        }
    }

    fn primary(&mut self) -> Result<Expr, CompileError> {
        let Some((_, token)) = self.peek().cloned() else {
            return Err(self.error("unexpected end of the expression"));
        };
        self.position += 1;
        match token {
            Token::Int(value) => Ok(Expr::Int(value)),
            Token::Uint(value) => Ok(Expr::Uint(value)),
            Token::Double(value) => Ok(Expr::Double(value)),
            Token::Str(text) => Ok(Expr::Str(text)),
            Token::Punct("(") => {
                let inner = self.expression()?;
                self.expect(")")?;
                Ok(inner)
            }
            Token::Ident(name) if self.eat("(") => self.call(&name),
            Token::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Bool(true)),
                "false" => Ok(Expr::Bool(false)),
                "null" => Ok(Expr::Null),
                _ => match self.variables.iter().position(|variable| *variable == name) {
                    Some(index) => Ok(Expr::Variable(index)),
                    None => {
                        self.position -= 1;
                        Err(self.error(format!("undeclared reference to '{name}'")))
                    }
                },
            },
            other => {
                self.position -= 1;
                Err(self.error(format!("unexpected {other}")))
            }
        }
    }

    fn call(&mut self, function: &str) -> Result<Expr, CompileError> {
        self.descend()?;
        let argument = self.expression()?;
        self.expect(")")?;
        self.depth -= 1;
        match function {
            "has" => match argument {
                Expr::Select(target, field) => Ok(Expr::Has(target, field)),
                _ => Err(self.error("has() takes a field selection, such as has(usage.x)")),
            },
            "int" => Ok(Expr::ToInt(Box::new(argument))),
            "double" => Ok(Expr::ToDouble(Box::new(argument))),
            other => Err(self.error(format!("unsupported function '{other}'"))),
        }
    }
}

fn from_json(value: &Json) -> Value<'_> {
    match value {
        Json::Null => Value::Null,
        Json::Bool(flag) => Value::Bool(*flag),
        // A protobuf Struct holds every number as a double.
        Json::Number(number) => Value::Double(number.as_f64().unwrap_or(f64::NAN)),
        Json::String(text) => Value::Str(text.as_str().into()),
        Json::Array(_) | Json::Object(_) => Value::Json(value),
    }
}

fn type_name(value: &Value<'_>) -> &'static str {
    match value {
        Value::Int(_) => "int",
        Value::Uint(_) => "uint",
        Value::Double(_) => "double",
        Value::Bool(_) => "bool",
        Value::Str(_) => "string",
        Value::Null => "null",
        Value::Json(Json::Array(_)) => "list",
        Value::Json(_) => "map",
    }
}

fn field<'a>(target: Value<'a>, name: &str) -> Result<Value<'a>, EvalError> {
    match target {
        Value::Json(Json::Object(map)) => {
            map.get(name).map(from_json).ok_or_else(|| EvalError(format!("no such key: {name}")))
        }
        other => Err(EvalError(format!("cannot select '{name}' from a {}", type_name(&other)))),
    }
}

fn eval<'a>(expr: &Expr, bindings: &'a [Json]) -> Result<Value<'a>, EvalError> {
    Ok(match expr {
        Expr::Int(value) => Value::Int(*value),
        Expr::Uint(value) => Value::Uint(*value),
        Expr::Double(value) => Value::Double(*value),
        Expr::Bool(value) => Value::Bool(*value),
        Expr::Str(text) => Value::Str(text.clone().into()),
        Expr::Null => Value::Null,
        Expr::Variable(index) => bindings
            .get(*index)
            .map(from_json)
            .ok_or_else(|| EvalError("unbound variable".into()))?,
        Expr::Select(target, name) => field(eval(target, bindings)?, name)?,
        Expr::Index(target, index) => match (eval(target, bindings)?, eval(index, bindings)?) {
            (target @ Value::Json(Json::Object(_)), Value::Str(key)) => field(target, &key)?,
            (Value::Json(Json::Array(items)), index) => {
                let position = match index {
                    Value::Int(i) => usize::try_from(i).ok(),
                    Value::Uint(u) => usize::try_from(u).ok(),
                    _ => return Err(EvalError("a list index must be an integer".into())),
                };
                position
                    .and_then(|position| items.get(position))
                    .map(from_json)
                    .ok_or_else(|| EvalError("index out of range".into()))?
            }
            (target, _) => {
                return Err(EvalError(format!("cannot index a {}", type_name(&target))));
            }
        },
        Expr::Has(target, name) => match eval(target, bindings)? {
            Value::Json(Json::Object(map)) => Value::Bool(map.contains_key(name)),
            other => {
                return Err(EvalError(format!("has() on a {}", type_name(&other))));
            }
        },
        Expr::ToInt(argument) => match eval(argument, bindings)? {
            Value::Int(value) => Value::Int(value),
            Value::Uint(value) => {
                Value::Int(i64::try_from(value).map_err(|_| EvalError("int overflow".into()))?)
            }
            // CEL truncates toward zero and refuses what does not fit.
            Value::Double(value) if value.is_finite() && value.abs() < 9.223_372_036_854_775e18 => {
                Value::Int(value.trunc() as i64)
            }
            Value::Str(text) => {
                Value::Int(text.parse().map_err(|_| EvalError(format!("int({text:?})")))?)
            }
            other => return Err(EvalError(format!("int() of a {}", type_name(&other)))),
        },
        Expr::ToDouble(argument) => match eval(argument, bindings)? {
            Value::Int(value) => Value::Double(value as f64),
            Value::Uint(value) => Value::Double(value as f64),
            Value::Double(value) => Value::Double(value),
            Value::Str(text) => {
                Value::Double(text.parse().map_err(|_| EvalError(format!("double({text:?})")))?)
            }
            other => return Err(EvalError(format!("double() of a {}", type_name(&other)))),
        },
        Expr::Not(operand) => match eval(operand, bindings)? {
            Value::Bool(flag) => Value::Bool(!flag),
            other => return Err(EvalError(format!("'!' on a {}", type_name(&other)))),
        },
        Expr::Negate(operand) => match eval(operand, bindings)? {
            Value::Int(value) => {
                Value::Int(value.checked_neg().ok_or_else(|| EvalError("int overflow".into()))?)
            }
            Value::Double(value) => Value::Double(-value),
            other => return Err(EvalError(format!("'-' on a {}", type_name(&other)))),
        },
        Expr::And(left, right) => logical(false, eval(left, bindings), || eval(right, bindings))?,
        Expr::Or(left, right) => logical(true, eval(left, bindings), || eval(right, bindings))?,
        Expr::Conditional(condition, then, otherwise) => match eval(condition, bindings)? {
            Value::Bool(true) => eval(then, bindings)?,
            Value::Bool(false) => eval(otherwise, bindings)?,
            other => {
                return Err(EvalError(format!(
                    "a condition must be a bool, not a {}",
                    type_name(&other)
                )));
            }
        },
        Expr::Binary(op, left, right) => {
            binary(*op, eval(left, bindings)?, eval(right, bindings)?)?
        }
    })
}

/// `&&` (`decisive` false) and `||` (`decisive` true): the decisive value on either side wins
/// over an error or a non-bool on the other, as in CEL.
fn logical<'a>(
    decisive: bool,
    left: Result<Value<'a>, EvalError>,
    right: impl FnOnce() -> Result<Value<'a>, EvalError>,
) -> Result<Value<'a>, EvalError> {
    if matches!(left, Ok(Value::Bool(flag)) if flag == decisive) {
        return Ok(Value::Bool(decisive));
    }
    let right = right();
    if matches!(right, Ok(Value::Bool(flag)) if flag == decisive) {
        return Ok(Value::Bool(decisive));
    }
    match (left?, right?) {
        (Value::Bool(_), Value::Bool(_)) => Ok(Value::Bool(!decisive)),
        (left, right) => Err(EvalError(format!(
            "no logical operator for {} and {}",
            type_name(&left),
            type_name(&right)
        ))),
    }
}

fn as_number(value: &Value<'_>) -> Option<f64> {
    match value {
        Value::Int(value) => Some(*value as f64),
        Value::Uint(value) => Some(*value as f64),
        Value::Double(value) => Some(*value),
        _ => None,
    }
}

fn binary<'a>(op: BinaryOp, left: Value<'a>, right: Value<'a>) -> Result<Value<'a>, EvalError> {
    use BinaryOp::*;
    let overflow = || EvalError("integer overflow or division by zero".into());
    let no_overload = |left: &Value<'_>, right: &Value<'_>| {
        EvalError(format!(
            "no such overload: {:?} of {} and {}",
            op,
            type_name(left),
            type_name(right)
        ))
    };
    match op {
        Equal | NotEqual => {
            let equal = match (as_number(&left), as_number(&right)) {
                (Some(l), Some(r)) => l == r,
                _ => match (&left, &right) {
                    (Value::Json(l), Value::Json(r)) => l == r,
                    _ => left == right,
                },
            };
            Ok(Value::Bool(equal == (op == Equal)))
        }
        Less | LessOrEqual | Greater | GreaterOrEqual => {
            let ordering = match (&left, &right) {
                (Value::Str(l), Value::Str(r)) => Some(l.cmp(r)),
                _ => match (as_number(&left), as_number(&right)) {
                    (Some(l), Some(r)) => l.partial_cmp(&r),
                    _ => return Err(no_overload(&left, &right)),
                },
            };
            let Some(ordering) = ordering else { return Ok(Value::Bool(false)) };
            Ok(Value::Bool(match op {
                Less => ordering.is_lt(),
                LessOrEqual => ordering.is_le(),
                Greater => ordering.is_gt(),
                _ => ordering.is_ge(),
            }))
        }
        Add | Subtract | Multiply | Divide | Remainder => match (&left, &right) {
            (Value::Int(l), Value::Int(r)) => Ok(Value::Int(
                match op {
                    Add => l.checked_add(*r),
                    Subtract => l.checked_sub(*r),
                    Multiply => l.checked_mul(*r),
                    Divide => l.checked_div(*r),
                    _ => l.checked_rem(*r),
                }
                .ok_or_else(overflow)?,
            )),
            (Value::Uint(l), Value::Uint(r)) => Ok(Value::Uint(
                match op {
                    Add => l.checked_add(*r),
                    Subtract => l.checked_sub(*r),
                    Multiply => l.checked_mul(*r),
                    Divide => l.checked_div(*r),
                    _ => l.checked_rem(*r),
                }
                .ok_or_else(overflow)?,
            )),
            (Value::Double(l), Value::Double(r)) if op != Remainder => {
                Ok(Value::Double(match op {
                    Add => l + r,
                    Subtract => l - r,
                    Multiply => l * r,
                    _ => l / r,
                }))
            }
            (Value::Str(l), Value::Str(r)) if op == Add => Ok(Value::Str(format!("{l}{r}").into())),
            _ => Err(no_overload(&left, &right)),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(source: &str, usage: Json) -> Result<Value<'static>, EvalError> {
        let program = Program::compile(source, &["usage"]).unwrap();
        let bindings: &'static [Json] = Box::leak(Box::new([usage]));
        program.eval(bindings)
    }

    #[test]
    fn fields_are_doubles_and_add_up() {
        let usage = json!({"prompt_tokens": 7, "completion_tokens": 3});
        assert_eq!(
            run("usage.prompt_tokens + usage.completion_tokens", usage),
            Ok(Value::Double(10.0))
        );
    }

    #[test]
    fn has_and_the_conditional() {
        let usage = json!({"prompt_tokens": 7});
        assert_eq!(run("has(usage.completion_tokens)", usage.clone()), Ok(Value::Bool(false)));
        assert_eq!(run("has(usage.prompt_tokens)", usage.clone()), Ok(Value::Bool(true)));
        assert_eq!(
            run("has(usage.prompt_tokens) ? usage.prompt_tokens : 0.0", usage.clone()),
            Ok(Value::Double(7.0))
        );
        assert_eq!(
            run("has(usage.completion_tokens) ? usage.completion_tokens : 0", usage),
            Ok(Value::Int(0))
        );
    }

    #[test]
    fn a_missing_field_is_an_error_that_and_can_absorb() {
        let usage = json!({"prompt_tokens": 7});
        assert!(run("usage.completion_tokens", usage.clone()).is_err());
        assert_eq!(
            run("usage.completion_tokens > 1 && false", usage.clone()),
            Ok(Value::Bool(false))
        );
        assert_eq!(run("true || usage.nope > 1", usage), Ok(Value::Bool(true)));
    }

    #[test]
    fn mixed_arithmetic_has_no_overload_but_comparison_does() {
        let usage = json!({"prompt_tokens": 7});
        assert!(run("usage.prompt_tokens + 1", usage.clone()).is_err());
        assert_eq!(run("usage.prompt_tokens > 1", usage.clone()), Ok(Value::Bool(true)));
        assert_eq!(run("int(usage.prompt_tokens) * 2 - 1", usage), Ok(Value::Int(13)));
    }

    #[test]
    fn precedence_nesting_and_literals() {
        let usage = json!({"d": {"c": 4}});
        assert_eq!(run("1 + 2 * 3 % 4", usage.clone()), Ok(Value::Int(3)));
        assert_eq!(run("(1 + 2) * -3", usage.clone()), Ok(Value::Int(-9)));
        assert_eq!(run("usage.d.c / 8.0", usage.clone()), Ok(Value::Double(0.5)));
        assert_eq!(run("usage[\"d\"]['c'] == 4", usage.clone()), Ok(Value::Bool(true)));
        assert_eq!(run("!(2u < 1u) ? 'a' + \"b\" : 'c'", usage), Ok(Value::Str("ab".into())));
        assert!(run("9223372036854775807 + 1", json!({})).is_err());
        assert!(run("1 / 0", json!({})).is_err());
    }

    #[test]
    fn compile_errors_name_the_problem() {
        let error = |source: &str| Program::compile(source, &["usage"]).unwrap_err().to_string();
        assert!(error("usage.a +").contains("end"), "{}", error("usage.a +"));
        assert!(error("request.a").contains("undeclared reference to 'request'"));
        assert!(error("size(usage)").contains("unsupported function 'size'"));
        assert!(error("has(usage)").contains("has() takes a field selection"));
        assert!(error("usage.a $ 1").contains("unexpected character '$'"));
        assert!(error("(1").contains("expected ')'"));
        assert!(error("1 2").contains("after the expression"));
        assert!(error(&"(".repeat(200)).contains("nested deeper"));
        assert!(error(&"!".repeat(200)).contains("nested deeper"));
        assert!(error("'abc").contains("unterminated"));
        assert!(error(&"1 + ".repeat(600)).contains("longer than"));
    }

    #[test]
    fn comments_and_newlines_are_skipped() {
        let program = Program::compile("// total\nusage.a +\n  usage.b\n", &["usage"]).unwrap();
        let bindings = [json!({"a": 1, "b": 2})];
        assert_eq!(program.eval(&bindings), Ok(Value::Double(3.0)));
    }
}
