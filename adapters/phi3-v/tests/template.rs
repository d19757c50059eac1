//! The `<|image_N|>` rules of the Phi-3-V template on the fixture's tokenizer: written tags
//! place images as the Hub processor does (and replace the image parts a dataset record
//! without `<image>` gets in front), and a tag naming a missing image or an image without a
//! placeholder is an error that says which.

mod common;

use common::Fixture;
use lmms_ft_core::data::{Conversation, Part, Role, Turn};
use lmms_ft_core::family::{ChatTemplate, Family, MediaTokens};
use lmms_ft_phi3_v::family::Phi3V;

fn user(parts: Vec<Part>) -> Turn {
    Turn {
        role: Role::User,
        parts,
    }
}

fn text(t: &str) -> Part {
    Part::Text { text: t.into() }
}

fn conv(parts: Vec<Part>, answer: &str) -> Conversation {
    Conversation {
        turns: vec![user(parts), Turn::text(Role::Assistant, answer)],
    }
}

#[test]
fn written_tags_place_images_like_the_hub_processor() {
    let fx = Fixture::load();
    let config = Phi3V::config(&fx.dir).unwrap();
    let template = Phi3V::template(&config, &fx.dir).unwrap();
    let ids = fx.ids("image", "input_ids");
    let count = ids.iter().filter(|&&i| i < 0).count();
    let media = MediaTokens {
        images: vec![count],
        videos: vec![],
    };
    // As a Phi-3-V dataset writes it: the tag in the text, and (LLaVA-format convention) the
    // record's image also put in front as a part, which the tag supersedes.
    for parts in [
        vec![text("<|image_1|>\nDescribe it.")],
        vec![Part::Image { index: 0 }, text("<|image_1|>\nDescribe it.")],
    ] {
        let enc = template
            .encode(&conv(parts, "Waves."), &media, false)
            .unwrap();
        assert_eq!(enc.input_ids, ids);
        assert_eq!(enc.labels, fx.ids("image", "rule_labels"));
    }
}

#[test]
fn missing_images_and_unplaced_images_are_errors() {
    let fx = Fixture::load();
    let config = Phi3V::config(&fx.dir).unwrap();
    let template = Phi3V::template(&config, &fx.dir).unwrap();
    let two = MediaTokens {
        images: vec![757, 625],
        videos: vec![],
    };
    let err = template
        .encode(
            &conv(vec![text("<|image_1|> and <|image_3|>?")], "No."),
            &two,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<|image_3|> names image 3 but the sample has 2 image(s)"),
        "{err}"
    );
    let err = template
        .encode(&conv(vec![text("<|image_1|> only?")], "Yes."), &two, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image 2 of the sample's 2 has no placeholder"),
        "{err}"
    );
    let one = MediaTokens {
        images: vec![757],
        videos: vec![],
    };
    let err = template
        .encode(&conv(vec![text("What is it?")], "A cat."), &one, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image 1 of the sample's 1 has no placeholder"),
        "{err}"
    );
    let err = template
        .encode(
            &conv(vec![Part::Image { index: 1 }, text("Two?")], "No."),
            &one,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("names image 2 but the sample has 1 image(s)"),
        "{err}"
    );
}
