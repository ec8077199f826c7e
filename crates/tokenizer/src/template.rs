//! Chat templates: the Jinja program a model ships in its `tokenizer_config.json`, rendered
//! the way Hugging Face's `apply_chat_template` renders it (which is what vLLM runs).

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, context};

use crate::error::TokenizerError;

/// Instructions one rendering may spend before it is abandoned. A template's loops run over
/// the request's messages, which the client controls; this keeps a hostile request (hundreds
/// of thousands of messages) from holding a core. A 4K-token chat spends a few thousand.
const RENDER_FUEL: u64 = 5_000_000;

/// One chat message as the template sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: &'a str,
    /// The message's text.
    pub content: &'a str,
}

/// A compiled chat template and the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// The name the template is compiled under.
const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source` (Jinja) to be rendered with these special tokens (empty when the
    /// model has none).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        // The options transformers compiles chat templates with.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|error| TokenizerError::Template(describe(&error)))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| TokenizerError::Template(describe(&error)))?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// The prompt text the engine builds for `messages`, with the assistant's turn opened
    /// (`add_generation_prompt`, as vLLM sets it for a chat completion by default).
    pub fn render(&self, messages: &[ChatMessage<'_>]) -> Result<String, TokenizerError> {
        self.render_with(messages, true)
    }

    /// As [`Self::render`], choosing whether the assistant's turn is opened.
    pub fn render_with(
        &self,
        messages: &[ChatMessage<'_>],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|message| context! { role => message.role, content => message.content })
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| TokenizerError::Template(describe(&error)))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                tools => Value::from(()),
            })
            .map_err(|error| TokenizerError::Render(describe(&error)))
    }
}

/// `raise_exception(message)`: templates call it to refuse a conversation (roles out of
/// order, say); the rendering fails with the template's message.
fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: Llama 3.x templates put today's date in the system prompt. The
/// date changes the prompt's tokens once a day, as on the engine; routing needs no more than
/// the day, so only `%d`, `%b`, `%B`, `%m`, `%Y` and `%y` are expanded (in UTC).
fn strftime_now(format: String) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::with_capacity(format.len() + 8);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The proleptic Gregorian date of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A Jinja error with its cause and line, on one line.
fn describe(error: &JinjaError) -> String {
    let mut text = error.to_string();
    if let Some(line) = error.line() {
        text.push_str(&format!(" (template line {line})"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn strftime_expands_the_date_fields_and_keeps_the_rest() {
        let text = strftime_now("%d %b %Y|%B|%m/%y|%%|%H".to_owned());
        let parts: Vec<&str> = text.split('|').collect();
        assert_eq!(parts.len(), 5);
        assert_eq!(parts[0].len(), "01 Jan 2026".len());
        assert!(parts[0][..2].bytes().all(|b| b.is_ascii_digit()));
        assert!(parts[1].starts_with(&parts[0][3..6]));
        assert_eq!(parts[3], "%");
        assert_eq!(parts[4], "%H");
    }

    #[test]
    fn raise_exception_fails_the_rendering_with_the_templates_words() {
        let template = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}\
             {% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let error = template.render(&[ChatMessage { role: "assistant", content: "hi" }]);
        assert!(
            matches!(&error, Err(TokenizerError::Render(text)) if text.contains("must start with user")),
            "{error:?}"
        );
        assert_eq!(template.render(&[ChatMessage { role: "user", content: "hi" }]).unwrap(), "ok");
    }

    #[test]
    fn a_broken_template_is_refused_with_its_line() {
        let error = ChatTemplate::new("line one\n{% for m in messages %}", "", "").unwrap_err();
        assert!(
            matches!(&error, TokenizerError::Template(text) if text.contains("line")),
            "{error}"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip() }}|{{ m.role.upper() }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let text = template.render(&[ChatMessage { role: "user", content: "  hi  " }]).unwrap();
        assert_eq!(text, "hi|USER");
    }

    #[test]
    fn a_runaway_conversation_runs_out_of_fuel_instead_of_holding_a_core() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{% for i in range(1000) %}{{ m.content }}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let messages = vec![ChatMessage { role: "user", content: "x" }; 10_000];
        assert!(matches!(template.render(&messages), Err(TokenizerError::Render(_))));
    }
}
