//! The parts of a multimodal model that train separately, and values kept per part.

use std::ops::{Index, IndexMut};

/// The parts of a multimodal model that train separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Vision encoder blocks and patch embedding.
    Vision,
    /// Projector / merger between the vision tower and the LLM.
    Projector,
    /// The language model, embeddings and `lm_head` included.
    Llm,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Vision, Component::Projector, Component::Llm];
}

/// One value per [`Component`], indexed by it (`modes[Component::Llm]`), so settings per
/// part (training mode, learning rate) are never addressed by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PerPart<T> {
    pub vision: T,
    pub projector: T,
    pub llm: T,
}

impl<T> PerPart<T> {
    /// The same value for every part.
    pub fn splat(value: T) -> Self
    where
        T: Clone,
    {
        PerPart {
            vision: value.clone(),
            projector: value.clone(),
            llm: value,
        }
    }

    /// Each part with its value, in [`Component::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Component, &T)> {
        Component::ALL.into_iter().map(move |c| (c, &self[c]))
    }

    /// Whether any part has `value`.
    pub fn contains(&self, value: &T) -> bool
    where
        T: PartialEq,
    {
        self.iter().any(|(_, v)| v == value)
    }
}

impl<T> Index<Component> for PerPart<T> {
    type Output = T;
    fn index(&self, c: Component) -> &T {
        match c {
            Component::Vision => &self.vision,
            Component::Projector => &self.projector,
            Component::Llm => &self.llm,
        }
    }
}

impl<T> IndexMut<Component> for PerPart<T> {
    fn index_mut(&mut self, c: Component) -> &mut T {
        match c {
            Component::Vision => &mut self.vision,
            Component::Projector => &mut self.projector,
            Component::Llm => &mut self.llm,
        }
    }
}
