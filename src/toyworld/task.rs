//! A personalization task of the toy world: the training scene (two or three objects of unnamed
//! appearance), its training caption, and the prompt sets of the paper's evaluation (combined,
//! then each concept alone: concept 1, concept 2 and, with three concepts, concept 3), each with
//! edits that the toy language can express (another background, an added named object).

use super::scene::personalization_scene_n;
use super::{render, Class, NamedColor, Scene};
use anyhow::Result;
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

/// The prompt sets of a task: all concepts together, and each concept alone.
#[derive(Clone, Debug)]
pub struct PromptSets {
    pub combined: Vec<PromptSpec>,
    /// `single[k]`: concept k (0-based) alone.
    pub single: Vec<Vec<PromptSpec>>,
}

impl PromptSets {
    /// Every set with its name ("combined", "concept1", "concept2", ...) and its concept
    /// (`None` for the combined set), in report order.
    pub fn named(&self) -> Vec<(String, Option<usize>, &[PromptSpec])> {
        let mut v = vec![("combined".to_string(), None, self.combined.as_slice())];
        v.extend(self.single.iter().enumerate().map(|(k, s)| (format!("concept{}", k + 1), Some(k), s.as_slice())));
        v
    }
}

pub struct Task {
    pub seed: u64,
    pub scene: Scene,
    pub image: RgbImage,
    /// (modifier token, class word) per concept.
    pub concepts: Vec<(String, Class)>,
}

impl Task {
    /// The two-concept task of personalization scene `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_concepts(seed, 2).expect("two concepts are always drawable")
    }

    /// The task of personalization scene `seed` with `n` concepts (1 to 3; see
    /// [`personalization_scene_n`]).
    pub fn with_concepts(seed: u64, n: usize) -> Result<Self> {
        let scene = personalization_scene_n(seed, n)?;
        let image = render(&scene).image;
        let concepts = scene.objects.iter().enumerate().map(|(k, o)| (format!("<new{}>", k + 1), o.class)).collect();
        Ok(Self { seed, scene, image, concepts })
    }

    /// "a <new1> star", "a <new1> star and a <new2> heart", "a <new1> star, a <new2> heart and
    /// a <new3> ring": the toy language's list grammar (that of [`super::caption`]).
    fn subject(&self, concepts: &[usize]) -> String {
        let items: Vec<String> = concepts.iter().map(|&k| self.phrase(k)).collect();
        match items.len() {
            0 => String::new(),
            1 => items[0].clone(),
            n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
        }
    }

    fn phrase(&self, k: usize) -> String {
        format!("a {} {}", self.concepts[k].0, self.concepts[k].1)
    }

    /// The training caption in the toy language: "a <new1> star and a <new2> heart on a gray
    /// background", "a <new1> star, a <new2> heart and a <new3> ring on a gray background"
    /// (used with the template `{}`).
    pub fn caption(&self) -> String {
        let all: Vec<usize> = (0..self.concepts.len()).collect();
        format!("{} on a {} background", self.subject(&all), self.scene.background)
    }

    /// A named object for "added object" edits: a class and colour unlike every concept's.
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
        let subject = self.subject(concepts);
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
        let n = self.concepts.len();
        PromptSets { combined: self.set(&(0..n).collect::<Vec<_>>()), single: (0..n).map(|k| self.set(&[k])).collect() }
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
        assert_eq!(sets.single.len(), 2);
        assert_eq!(sets.single[0].len(), 3);
        assert!(sets.single[0].iter().all(|p| p.prompt.contains("<new1>") && !p.prompt.contains("<new2>")));
        assert!(sets.single[1].iter().all(|p| p.prompt.contains("<new2>") && !p.prompt.contains("<new1>")));
        assert!(sets.combined.iter().all(|p| p.prompt.contains("<new1>") && p.prompt.contains("<new2>")));
        assert!(sets.combined[1].background != t.scene.background);
        assert!(sets.combined[2].added.is_some());
    }

    /// Three concepts: the caption lists them in the world's grammar and parses back to the
    /// scene's classes; each single set names its concept only; the added object is of a
    /// fourth class.
    #[test]
    fn three_concept_prompts() {
        for seed in 1..=5 {
            let t = Task::with_concepts(seed, 3).unwrap();
            assert_eq!(t.scene.objects.len(), 3);
            let c = t.caption();
            let classes: Vec<Class> = t.scene.objects.iter().map(|o| o.class).collect();
            let expected = format!(
                "a <new1> {}, a <new2> {} and a <new3> {} on a {} background",
                classes[0], classes[1], classes[2], t.scene.background
            );
            assert_eq!(c, expected);
            let parsed = crate::toyworld::parse_caption(&c.replace("<new1> ", "").replace("<new2> ", "").replace("<new3> ", "")).unwrap();
            assert_eq!(parsed.objects.iter().map(|o| o.class).collect::<Vec<_>>(), classes);
            let sets = t.prompt_sets();
            assert_eq!(sets.named().iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(), ["combined", "concept1", "concept2", "concept3"]);
            for (k, set) in sets.single.iter().enumerate() {
                for p in set {
                    assert_eq!(p.concepts, vec![k]);
                    for j in 0..3 {
                        assert_eq!(p.prompt.contains(&format!("<new{}>", j + 1)), j == k, "{}", p.prompt);
                    }
                }
            }
            let (_, added) = sets.combined[2].added.unwrap();
            assert!(!classes.contains(&added), "added {added} is one of the concepts' classes");
        }
        assert!(Task::with_concepts(1, 4).is_err());
    }
}
