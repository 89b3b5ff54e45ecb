//! The conversation templates llmfs carries, with FastChat's names and strings.
//!
//! Why a fixed table: these strings decide what a model is prompted with, so they are copied
//! from FastChat, not paraphrased. Every entry except `llama-3` and `gemma` was generated
//! from the `register_conv_template` calls of fschat 0.2.36 (the release on PyPI); those two
//! come from FastChat's main branch, which added them later. `scripts/fastchat_templates.py`
//! renders the same templates with FastChat itself, and `tests/chat_templates.rs` checks
//! every entry against that output, so a typo here fails a test.
//!
//! The set covers the families `detect()` knows; `one_shot` is FastChat's fallback.

use super::conversation::{Conversation, SepStyle};

/// In the order `template_names()` lists them.
static TEMPLATES: &[Conversation] = &[
    Conversation {
        name: "vicuna_v1.1",
        system_template: "{system_message}",
        system_message: "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles: ["USER", "ASSISTANT"],
        examples: &[],
        sep_style: SepStyle::AddColonTwo,
        sep: " ",
        sep2: "</s>",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "llama-2",
        system_template: "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        system_message: "",
        roles: ["[INST]", "[/INST]"],
        examples: &[],
        sep_style: SepStyle::Llama2,
        sep: " ",
        sep2: " </s><s>",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "llama-3",
        system_template: "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
        system_message: "",
        roles: ["user", "assistant"],
        examples: &[],
        sep_style: SepStyle::Llama3,
        sep: "",
        sep2: "",
        stop_str: &["<|eot_id|>"],
        stop_token_ids: &[128001, 128009],
    },
    Conversation {
        name: "mistral",
        system_template: "[INST] {system_message}\n",
        system_message: "",
        roles: ["[INST]", "[/INST]"],
        examples: &[],
        sep_style: SepStyle::Llama2,
        sep: " ",
        sep2: "</s>",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "zephyr",
        system_template: "<|system|>\n{system_message}",
        system_message: "",
        roles: ["<|user|>", "<|assistant|>"],
        examples: &[],
        sep_style: SepStyle::ChatMl,
        sep: "</s>",
        sep2: "",
        stop_str: &["</s>"],
        stop_token_ids: &[2],
    },
    Conversation {
        name: "alpaca",
        system_template: "{system_message}",
        system_message: "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        roles: ["### Instruction", "### Response"],
        examples: &[],
        sep_style: SepStyle::AddColonTwo,
        sep: "\n\n",
        sep2: "</s>",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "koala_v1",
        system_template: "{system_message}",
        system_message: "BEGINNING OF CONVERSATION:",
        roles: ["USER", "GPT"],
        examples: &[],
        sep_style: SepStyle::AddColonTwo,
        sep: " ",
        sep2: "</s>",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "dolly_v2",
        system_template: "{system_message}",
        system_message: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
        roles: ["### Instruction", "### Response"],
        examples: &[],
        sep_style: SepStyle::Dolly,
        sep: "\n\n",
        sep2: "### End",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "qwen-7b-chat",
        system_template: "<|im_start|>system\n{system_message}",
        system_message: "You are a helpful assistant.",
        roles: ["<|im_start|>user", "<|im_start|>assistant"],
        examples: &[],
        sep_style: SepStyle::ChatMl,
        sep: "<|im_end|>",
        sep2: "",
        stop_str: &["<|endoftext|>"],
        stop_token_ids: &[151643, 151644, 151645],
    },
    Conversation {
        name: "TinyLlama",
        system_template: "<|system|>\n{system_message}",
        system_message: "",
        roles: ["<|user|>", "<|assistant|>"],
        examples: &[],
        sep_style: SepStyle::ChatMl,
        sep: "</s>",
        sep2: "",
        stop_str: &["</s>"],
        stop_token_ids: &[2],
    },
    Conversation {
        name: "openchat_3.5",
        system_template: "{system_message}",
        system_message: "",
        roles: ["GPT4 Correct User", "GPT4 Correct Assistant"],
        examples: &[],
        sep_style: SepStyle::FalconChat,
        sep: "<|end_of_turn|>",
        sep2: "",
        stop_str: &[],
        stop_token_ids: &[],
    },
    Conversation {
        name: "deepseek-chat",
        system_template: "{system_message}",
        system_message: "<｜begin▁of▁sentence｜>",
        roles: ["User", "Assistant"],
        examples: &[],
        sep_style: SepStyle::DeepseekChat,
        sep: "\n\n",
        sep2: "<｜end▁of▁sentence｜>",
        stop_str: &["<｜end▁of▁sentence｜>"],
        stop_token_ids: &[],
    },
    Conversation {
        name: "orca-2",
        system_template: "<|im_start|>system\n{system_message}",
        system_message: "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. You carefully follow instructions. You are helpful and harmless and you follow ethical guidelines and promote positive behavior.",
        roles: ["<|im_start|>user", "<|im_start|>assistant"],
        examples: &[],
        sep_style: SepStyle::ChatMl,
        sep: "<|im_end|>",
        sep2: "",
        stop_str: &["<|im_end|>"],
        stop_token_ids: &[],
    },
    Conversation {
        name: "falcon",
        system_template: "{system_message}",
        system_message: "",
        roles: ["User", "Assistant"],
        examples: &[],
        sep_style: SepStyle::Rwkv,
        sep: "\n",
        sep2: "<|endoftext|>",
        stop_str: &["\nUser"],
        stop_token_ids: &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    },
    Conversation {
        name: "falcon-chat",
        system_template: "System: {system_message}",
        system_message: "",
        roles: ["User", "Falcon"],
        examples: &[],
        sep_style: SepStyle::FalconChat,
        sep: "\n",
        sep2: "<|endoftext|>",
        stop_str: &["\nUser:"],
        stop_token_ids: &[],
    },
    Conversation {
        name: "gemma",
        system_template: "{system_message}",
        system_message: "",
        roles: ["user", "model"],
        examples: &[],
        sep_style: SepStyle::Gemma,
        sep: "<end_of_turn>\n",
        sep2: "",
        stop_str: &["<end_of_turn>"],
        stop_token_ids: &[],
    },
    Conversation {
        name: "one_shot",
        system_template: "{system_message}",
        system_message: "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles: ["Human", "Assistant"],
        examples: &[(0, "Got any creative ideas for a 10 year old’s birthday?"), (1, "Of course! Here are some creative ideas for a 10-year-old's birthday party:\n1. Treasure Hunt: Organize a treasure hunt in your backyard or nearby park. Create clues and riddles for the kids to solve, leading them to hidden treasures and surprises.\n2. Science Party: Plan a science-themed party where kids can engage in fun and interactive experiments. You can set up different stations with activities like making slime, erupting volcanoes, or creating simple chemical reactions.\n3. Outdoor Movie Night: Set up a backyard movie night with a projector and a large screen or white sheet. Create a cozy seating area with blankets and pillows, and serve popcorn and snacks while the kids enjoy a favorite movie under the stars.\n4. DIY Crafts Party: Arrange a craft party where kids can unleash their creativity. Provide a variety of craft supplies like beads, paints, and fabrics, and let them create their own unique masterpieces to take home as party favors.\n5. Sports Olympics: Host a mini Olympics event with various sports and games. Set up different stations for activities like sack races, relay races, basketball shooting, and obstacle courses. Give out medals or certificates to the participants.\n6. Cooking Party: Have a cooking-themed party where the kids can prepare their own mini pizzas, cupcakes, or cookies. Provide toppings, frosting, and decorating supplies, and let them get hands-on in the kitchen.\n7. Superhero Training Camp: Create a superhero-themed party where the kids can engage in fun training activities. Set up an obstacle course, have them design their own superhero capes or masks, and organize superhero-themed games and challenges.\n8. Outdoor Adventure: Plan an outdoor adventure party at a local park or nature reserve. Arrange activities like hiking, nature scavenger hunts, or a picnic with games. Encourage exploration and appreciation for the outdoors.\nRemember to tailor the activities to the birthday child's interests and preferences. Have a great celebration!")],
        sep_style: SepStyle::AddColonSingle,
        sep: "\n### ",
        sep2: "",
        stop_str: &["###"],
        stop_token_ids: &[],
    },
];

/// The template FastChat registers under `name` (exact, case-sensitive, like
/// `get_conv_template`).
pub fn template(name: &str) -> Option<&'static Conversation> {
    TEMPLATES.iter().find(|t| t.name == name)
}

/// Every template name, in table order.
pub fn template_names() -> Vec<&'static str> {
    TEMPLATES.iter().map(|t| t.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let names = template_names();
        for (i, name) in names.iter().enumerate() {
            assert!(!names[..i].contains(name), "{name} twice");
            assert_eq!(template(name).map(|t| t.name), Some(*name));
        }
        assert!(template("Vicuna_v1.1").is_none(), "lookup is exact, like FastChat's");
    }

    #[test]
    fn system_templates_have_one_placeholder() {
        for t in TEMPLATES {
            assert_eq!(t.system_template.matches("{system_message}").count(), 1, "{}", t.name);
        }
    }

    #[test]
    fn one_shot_carries_its_example() {
        let t = template("one_shot").unwrap();
        assert_eq!(t.examples.len(), 2);
        let prompt = t.get_prompt(None, &[(0, Some("Hi")), (1, None)]);
        assert!(prompt.starts_with(t.system_message));
        assert!(prompt.contains(
            "\n### Human: Got any creative ideas for a 10 year old’s birthday?\n### Assistant: Of course!"
        ));
        assert!(prompt.ends_with("\n### Human: Hi\n### Assistant:"));
    }
}
