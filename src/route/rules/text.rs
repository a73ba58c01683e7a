//! String templates for header values and `add_fields`: `{path}` placeholders naming a
//! field path, `{{` and `}}` for literal braces.

use super::view::{FieldPath, View};

#[derive(Debug, Clone, PartialEq)]
pub(super) struct TextTemplate {
    parts: Vec<TextPart>,
}

#[derive(Debug, Clone, PartialEq)]
enum TextPart {
    Literal(String),
    Field(FieldPath),
}

impl TextTemplate {
    pub(super) fn parse(text: &str) -> Result<TextTemplate, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(pos) = rest.find(['{', '}']) {
            literal.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if let Some(after) = tail.strip_prefix("{{") {
                literal.push('{');
                rest = after;
            } else if let Some(after) = tail.strip_prefix("}}") {
                literal.push('}');
                rest = after;
            } else if tail.starts_with('}') {
                return Err(format!(
                    "unmatched }} in {text:?} (write }}}} for a literal brace)"
                ));
            } else {
                let Some(close) = tail.find('}') else {
                    return Err(format!(
                        "unclosed {{ in {text:?} (write {{{{ for a literal brace)"
                    ));
                };
                let name = &tail[1..close];
                let path =
                    FieldPath::parse(name).map_err(|e| format!("placeholder {{{name}}}: {e}"))?;
                if !literal.is_empty() {
                    parts.push(TextPart::Literal(std::mem::take(&mut literal)));
                }
                parts.push(TextPart::Field(path));
                rest = &tail[close + 1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(TextPart::Literal(literal));
        }
        Ok(TextTemplate { parts })
    }

    /// `None` when a placeholder's field is missing or JSON null.
    pub(super) fn render(&self, view: &View<'_>) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TextPart::Literal(l) => out.push_str(l),
                TextPart::Field(path) => out.push_str(&view.resolve(path)?.to_text()?),
            }
        }
        Some(out)
    }

    pub(super) fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            TextPart::Literal(l) => Some(l.as_str()),
            TextPart::Field(_) => None,
        })
    }
}
