//! Captions of scenes, and their parsing back.
//!
//! Grammar: `a red striped ball, an orange box and a blue ball on a white background`: objects
//! in drawing order, "an" before a vowel, the pattern word left out for plain, commas between
//! all but the last two. An object with an unnamed appearance is named by its class alone.

use super::scene::{Object, Scene};
use super::vocab::{Appearance, Class, NamedColor, Pattern};
use anyhow::{bail, Context, Result};

fn with_article(phrase: &str) -> String {
    let an = phrase.starts_with(|c: char| "aeiou".contains(c));
    format!("{} {phrase}", if an { "an" } else { "a" })
}

/// "a X", "a X and a Y", "a X, a Y and a Z".
fn join(phrases: &[String]) -> String {
    let items: Vec<String> = phrases.iter().map(|p| with_article(p)).collect();
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

/// An object's words without article: "red striped ball", "blue box"; "ball" when unnamed.
pub fn object_phrase(o: &Object) -> String {
    let mut words = o.appearance.words();
    words.push(o.class.word());
    words.join(" ")
}

/// The full caption: "a red striped ball and a blue box on a white background".
pub fn caption(scene: &Scene) -> String {
    let phrases: Vec<String> = scene.objects.iter().map(object_phrase).collect();
    format!("{} on a {} background", join(&phrases), scene.background)
}

/// The classes only: "a ball and a box".
pub fn class_caption(scene: &Scene) -> String {
    let phrases: Vec<String> = scene.objects.iter().map(|o| o.class.word().to_string()).collect();
    join(&phrases)
}

/// The placeholder token of personalization concept `k` (0-based): `<new1>`, `<new2>`, ...
pub fn personalization_token(k: usize) -> String {
    format!("<new{}>", k + 1)
}

/// `<new1> ball and <new2> box`: a placeholder token before each class word, no background.
pub fn personalization_caption(scene: &Scene) -> String {
    let items: Vec<String> =
        scene.objects.iter().enumerate().map(|(k, o)| format!("{} {}", personalization_token(k), o.class)).collect();
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

/// One object of a parsed caption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedObject {
    pub color: Option<NamedColor>,
    /// `None` when no pattern word was given (plain, or no colour named either).
    pub pattern: Option<Pattern>,
    pub class: Class,
}

impl ParsedObject {
    /// Whether `o` fits this description (an unnamed look fits only a bare class).
    pub fn matches(&self, o: &Object) -> bool {
        if self.class != o.class {
            return false;
        }
        match (&o.appearance, self.color) {
            (_, None) => self.pattern.is_none(),
            (Appearance::Named { color, pattern }, Some(c)) => {
                *color == c && self.pattern.unwrap_or(Pattern::Plain) == *pattern
            }
            (Appearance::Unnamed(_), Some(_)) => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCaption {
    pub objects: Vec<ParsedObject>,
    pub background: Option<NamedColor>,
}

/// Parses a caption of the grammar above (background optional, as in "a red ball").
pub fn parse_caption(text: &str) -> Result<ParsedCaption> {
    let text = text.trim().to_lowercase();
    let (objects_part, background) = match text.rsplit_once(" on a ") {
        Some((head, tail)) => {
            let word =
                tail.strip_suffix(" background").with_context(|| format!("expected '... background' in {text:?}"))?;
            let bg = NamedColor::from_word(word).with_context(|| format!("unknown background colour {word:?}"))?;
            (head.to_string(), Some(bg))
        }
        None => (text.clone(), None),
    };
    let mut objects = Vec::new();
    for item in objects_part.split(", ").flat_map(|s| s.split(" and ")) {
        let words: Vec<&str> = item.split_whitespace().collect();
        let Some((&article, rest)) = words.split_first() else { bail!("empty object in {text:?}") };
        if article != "a" && article != "an" {
            bail!("expected 'a' or 'an' before {item:?}");
        }
        let (color, pattern, class) = match rest {
            [class] => (None, None, class),
            [color, class] => (Some(*color), None, class),
            [color, pattern, class] => (Some(*color), Some(*pattern), class),
            _ => bail!("cannot read object {item:?}"),
        };
        objects.push(ParsedObject {
            color: color
                .map(|w| NamedColor::from_word(w).with_context(|| format!("unknown colour {w:?}")))
                .transpose()?,
            pattern: pattern
                .map(|w| Pattern::from_word(w).with_context(|| format!("unknown pattern {w:?}")))
                .transpose()?,
            class: Class::from_word(class).with_context(|| format!("unknown class {class:?}"))?,
        });
    }
    Ok(ParsedCaption { objects, background })
}
