//! A personalization task of the toy world: the training scene (two objects of unnamed
//! appearance), its training caption, and the three prompt sets of the paper's evaluation
//! (combined, concept 1 alone, concept 2 alone), each with edits that the toy language can
//! express (another background, an added named object).

use super::{personalization_scene, render, Class, NamedColor, Scene};
use image::RgbImage;

/// What a prompt asks for, so a scorer can check it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSpec {
    pub prompt: String,
    /// Which learned concepts (0-based) should appear.
    pub concepts: Vec<usize>,
    pub background: NamedColor,
    /// An added named object (colour, class), if the prompt adds one.
    pub added: Option<(NamedColor, Class)>,
    /// True for the unedited prompt of its set.
    pub base: bool,
}

/// The three prompt sets of a task.
#[derive(Clone, Debug)]
pub struct PromptSets {
    pub combined: Vec<PromptSpec>,
    pub concept1: Vec<PromptSpec>,
    pub concept2: Vec<PromptSpec>,
}

pub struct Task {
    pub seed: u64,
    pub scene: Scene,
    pub image: RgbImage,
    /// (modifier token, class word) per concept.
    pub concepts: Vec<(String, Class)>,
}

impl Task {
    /// The task of personalization scene `seed`.
    pub fn new(seed: u64) -> Self {
        let scene = personalization_scene(seed);
        let image = render(&scene).image;
        let concepts = scene.objects.iter().enumerate().map(|(k, o)| (format!("<new{}>", k + 1), o.class)).collect();
        Self { seed, scene, image, concepts }
    }

    fn phrase(&self, k: usize) -> String {
        format!("a {} {}", self.concepts[k].0, self.concepts[k].1)
    }

    /// The training caption in the toy language: "a <new1> star and a <new2> heart on a gray
    /// background" (used with the template `{}`).
    pub fn caption(&self) -> String {
        format!("{} and {} on a {} background", self.phrase(0), self.phrase(1), self.scene.background)
    }

    /// A named object for "added object" edits: a class and colour unlike both concepts.
    fn added_object(&self) -> (NamedColor, Class) {
        let class = Class::ALL.iter().copied().find(|c| self.concepts.iter().all(|(_, k)| k != c)).unwrap_or(Class::Ball);
        let color = [NamedColor::Red, NamedColor::Blue, NamedColor::Yellow, NamedColor::Green]
            .into_iter()
            .find(|c| *c != self.scene.background)
            .unwrap_or(NamedColor::Red);
        (color, class)
    }

    fn other_background(&self) -> NamedColor {
        NamedColor::BACKGROUND.iter().copied().find(|b| *b != self.scene.background).unwrap_or(NamedColor::White)
    }

    fn set(&self, concepts: &[usize]) -> Vec<PromptSpec> {
        let subject = concepts.iter().map(|&k| self.phrase(k)).collect::<Vec<_>>().join(" and ");
        let bg = self.scene.background;
        let other = self.other_background();
        let (color, class) = self.added_object();
        let spec = |prompt: String, background, added, base| PromptSpec { prompt, concepts: concepts.to_vec(), background, added, base };
        vec![
            spec(format!("{subject} on a {bg} background"), bg, None, true),
            spec(format!("{subject} on a {other} background"), other, None, false),
            spec(format!("{subject} and a {color} {class} on a {bg} background"), bg, Some((color, class)), false),
        ]
    }

    pub fn prompt_sets(&self) -> PromptSets {
        PromptSets { combined: self.set(&[0, 1]), concept1: self.set(&[0]), concept2: self.set(&[1]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_name_the_concepts_and_edits() {
        let t = Task::new(3);
        let c = t.caption();
        assert!(c.starts_with("a <new1> ") && c.contains(" and a <new2> ") && c.ends_with(" background"));
        let sets = t.prompt_sets();
        assert_eq!(sets.concept1.len(), 3);
        assert!(sets.concept1.iter().all(|p| p.prompt.contains("<new1>") && !p.prompt.contains("<new2>")));
        assert!(sets.concept2.iter().all(|p| p.prompt.contains("<new2>") && !p.prompt.contains("<new1>")));
        assert!(sets.combined.iter().all(|p| p.prompt.contains("<new1>") && p.prompt.contains("<new2>")));
        assert!(sets.combined[1].background != t.scene.background);
        assert!(sets.combined[2].added.is_some());
    }
}
