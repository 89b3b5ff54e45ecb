//! Built-in descriptions of well-known models: FastChat's model_registry.py.
//!
//! Why: `llmfs ls`/`info` show a simple name, a link and a line of description for an entry
//! the user registered without `--link`/`--description`, the way FastChat's web UI does
//! for the models it serves.
//!
//! `FASTCHAT` was generated from the `register_model_info` calls of fschat 0.2.36 (the
//! registry's final state, so a name registered twice keeps its last info); `LATER` holds
//! entries from FastChat's main branch for families added after 0.2.36 (Llama 3, Gemma) and
//! the Vicuna v1.5 names main lists. FastChat registers nothing for Orca-2, so neither does
//! llmfs.
//!
//! Matching is case-insensitive on the whole name, after dropping a leading `org/` (so a
//! Hugging Face repo id works), and tries, in order: the name as given, the name without a
//! `-hf` suffix or a `meta-` prefix (Meta's repos are "Llama-2-7b-chat-hf",
//! "Meta-Llama-3-8B-Instruct"; FastChat's names "llama-2-7b-chat", "llama-3-8b-instruct"),
//! and finally the repo name of an entry's Hugging Face link ("TinyLlama-1.1B-Chat-v1.0").

use super::ModelInfo;

struct Known {
    names: &'static [&'static str],
    simple_name: &'static str,
    link: &'static str,
    description: &'static str,
}

impl Known {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            simple_name: self.simple_name.to_string(),
            link: self.link.to_string(),
            description: self.description.to_string(),
        }
    }

    /// The repo of a `https://huggingface.co/ORG/REPO` link, lowercased.
    fn hf_repo(&self) -> Option<String> {
        let path = self.link.strip_prefix("https://huggingface.co/")?;
        match path.split('/').collect::<Vec<_>>()[..] {
            [_org, repo] if !repo.is_empty() => Some(repo.to_lowercase()),
            _ => None,
        }
    }
}

/// FastChat's description of model `name` (a FastChat model name or a Hugging Face repo id
/// or name), if it is a well-known one.
pub fn lookup(name: &str) -> Option<ModelInfo> {
    let base = name.trim_end_matches('/').rsplit('/').next().unwrap_or(name).to_lowercase();
    if base.is_empty() {
        return None;
    }
    let mut candidates = vec![base.clone()];
    if let Some(s) = base.strip_suffix("-hf") {
        candidates.push(s.to_string());
    }
    if let Some(s) = base.strip_prefix("meta-") {
        candidates.push(s.to_string());
    }
    let all = || FASTCHAT.iter().chain(LATER);
    for candidate in &candidates {
        if let Some(known) = all().find(|k| k.names.iter().any(|n| n.eq_ignore_ascii_case(candidate))) {
            return Some(known.info());
        }
    }
    all().find(|k| k.hf_repo().as_deref() == Some(base.as_str())).map(Known::info)
}

/// Entries of FastChat main that fschat 0.2.36 lacks.
static LATER: &[Known] = &[
    Known {
        names: &["llama-3-70b-instruct", "llama-3-8b-instruct"],
        simple_name: "Llama 3",
        link: "https://ai.meta.com/blog/meta-llama-3/",
        description: "Open foundation and chat models by Meta",
    },
    Known {
        names: &["gemma-7b-it", "gemma-2b-it"],
        simple_name: "Gemma",
        link: "https://blog.google/technology/developers/gemma-open-models/",
        description: "Gemma by Google",
    },
    Known {
        names: &["vicuna-13b-v1.5", "vicuna-7b-v1.5"],
        simple_name: "Vicuna",
        link: "https://lmsys.org/blog/2023-03-30-vicuna/",
        description: "A chat assistant fine-tuned on user-shared conversations by LMSYS",
    },
];

/// fschat 0.2.36's model_registry.py, in registration order.
static FASTCHAT: &[Known] = &[
    Known {
        names: &["IEITYuan/Yuan2-2B-Janus-hf", "IEITYuan/Yuan2-2B-hf", "IEITYuan/Yuan2-51B-hf", "IEITYuan/Yuan2-102B-hf"],
        simple_name: "IEIT-Yuan2",
        link: "https://github.com/IEIT-Yuan/Yuan-2.0",
        description: "Yuan2.0 is a new generation Fundamental Large Language Model developed by IEIT System.",
    },
    Known {
        names: &["mixtral-8x7b-instruct-v0.1", "mistral-medium", "mistral-7b-instruct-v0.2", "mistral-7b-instruct"],
        simple_name: "Mixtral of experts",
        link: "https://mistral.ai/news/mixtral-of-experts/",
        description: "A Mixture-of-Experts model by Mistral AI",
    },
    Known {
        names: &["qwen1.5-72b-chat", "qwen1.5-14b-chat", "qwen1.5-7b-chat", "qwen1.5-4b-chat", "qwen1.5-1.8b-chat", "qwen1.5-0.5b-chat"],
        simple_name: "Qwen 1.5",
        link: "https://qwenlm.github.io/blog/qwen1.5/",
        description: "A large language model by Alibaba Cloud",
    },
    Known {
        names: &["qwen-14b-chat"],
        simple_name: "Qwen",
        link: "https://huggingface.co/Qwen",
        description: "A large language model by Alibaba Cloud",
    },
    Known {
        names: &["bard-feb-2024", "bard-jan-24-gemini-pro"],
        simple_name: "Bard",
        link: "https://bard.google.com/",
        description: "Bard by Google",
    },
    Known {
        names: &["gemini-pro", "gemini-pro-dev-api"],
        simple_name: "Gemini",
        link: "https://blog.google/technology/ai/google-gemini-pro-imagen-duet-ai-update/",
        description: "Gemini by Google",
    },
    Known {
        names: &["deepseek-llm-67b-chat"],
        simple_name: "DeepSeek LLM",
        link: "https://huggingface.co/deepseek-ai/deepseek-llm-67b-chat",
        description: "An advanced language model by DeepSeek",
    },
    Known {
        names: &["stripedhyena-nous-7b"],
        simple_name: "StripedHyena-Nous",
        link: "https://huggingface.co/togethercomputer/StripedHyena-Nous-7B",
        description: "A chat model developed by Together Research and Nous Research.",
    },
    Known {
        names: &["solar-10.7b-instruct-v1.0"],
        simple_name: "SOLAR-10.7B-Instruct",
        link: "https://huggingface.co/upstage/SOLAR-10.7B-Instruct-v1.0",
        description: "A model trained using depth up-scaling by Upstage AI",
    },
    Known {
        names: &["gpt-4-turbo", "gpt-4-1106-preview", "gpt-4-0125-preview"],
        simple_name: "GPT-4-Turbo",
        link: "https://platform.openai.com/docs/models/gpt-4-and-gpt-4-turbo",
        description: "GPT-4-Turbo by OpenAI",
    },
    Known {
        names: &["gpt-3.5-turbo", "gpt-3.5-turbo-0125", "gpt-3.5-turbo-1106", "gpt-3.5-turbo-0314", "gpt-3.5-turbo-0613"],
        simple_name: "GPT-3.5",
        link: "https://platform.openai.com/docs/models/gpt-3-5",
        description: "GPT-3.5-Turbo by OpenAI",
    },
    Known {
        names: &["gpt-4", "gpt-4-0314", "gpt-4-0613"],
        simple_name: "GPT-4",
        link: "https://openai.com/research/gpt-4",
        description: "GPT-4 by OpenAI",
    },
    Known {
        names: &["claude-2.1", "claude-2.0"],
        simple_name: "Claude",
        link: "https://www.anthropic.com/index/claude-2",
        description: "Claude 2 by Anthropic",
    },
    Known {
        names: &["claude-1"],
        simple_name: "Claude",
        link: "https://www.anthropic.com/index/introducing-claude",
        description: "Claude 1 by Anthropic",
    },
    Known {
        names: &["claude-instant-1", "claude-instant-1.2"],
        simple_name: "Claude Instant",
        link: "https://www.anthropic.com/index/introducing-claude",
        description: "Claude Instant by Anthropic",
    },
    Known {
        names: &["nous-hermes-2-mixtral-8x7b-dpo"],
        simple_name: "Nous-Hermes-2-Mixtral-8x7B-DPO",
        link: "https://huggingface.co/NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO",
        description: "Nous Hermes finetuned from Mixtral 8x7B",
    },
    Known {
        names: &["openchat-3.5-0106", "openchat-3.5"],
        simple_name: "OpenChat 3.5",
        link: "https://github.com/imoneoi/openchat",
        description: "An open model fine-tuned on Mistral-7B using C-RLFT",
    },
    Known {
        names: &["llama2-70b-steerlm-chat"],
        simple_name: "Llama2-70B-SteerLM-Chat",
        link: "https://huggingface.co/nvidia/Llama2-70B-SteerLM-Chat",
        description: "A Llama fine-tuned with SteerLM method by NVIDIA",
    },
    Known {
        names: &["pplx-70b-online", "pplx-7b-online"],
        simple_name: "pplx-online-llms",
        link: "https://blog.perplexity.ai/blog/introducing-pplx-online-llms",
        description: "Online LLM API by Perplexity AI",
    },
    Known {
        names: &["openhermes-2.5-mistral-7b"],
        simple_name: "OpenHermes-2.5-Mistral-7B",
        link: "https://huggingface.co/teknium/OpenHermes-2.5-Mistral-7B",
        description: "A mistral-based model fine-tuned on 1M GPT-4 outputs",
    },
    Known {
        names: &["starling-lm-7b-alpha"],
        simple_name: "Starling-LM-7B-alpha",
        link: "https://huggingface.co/berkeley-nest/Starling-LM-7B-alpha",
        description: "An open model trained using RLAIF by Berkeley",
    },
    Known {
        names: &["tulu-2-dpo-70b"],
        simple_name: "Tulu 2",
        link: "https://huggingface.co/allenai/tulu-2-dpo-70b",
        description: "An instruction and RLHF model by UW/AllenAI",
    },
    Known {
        names: &["yi-34b-chat", "yi-6b-chat"],
        simple_name: "Yi-Chat",
        link: "https://huggingface.co/01-ai/Yi-34B-Chat",
        description: "A large language model by 01 AI",
    },
    Known {
        names: &["llama-2-70b-chat", "llama-2-34b-chat", "llama-2-13b-chat", "llama-2-7b-chat"],
        simple_name: "Llama 2",
        link: "https://ai.meta.com/llama/",
        description: "Open foundation and fine-tuned chat models by Meta",
    },
    Known {
        names: &["vicuna-33b", "vicuna-33b-v1.3", "vicuna-13b", "vicuna-13b-v1.3", "vicuna-7b", "vicuna-7b-v1.3"],
        simple_name: "Vicuna",
        link: "https://lmsys.org/blog/2023-03-30-vicuna/",
        description: "A chat assistant fine-tuned on user-shared conversations by LMSYS",
    },
    Known {
        names: &["chatglm3-6b", "chatglm2-6b", "chatglm-6b"],
        simple_name: "ChatGLM",
        link: "https://chatglm.cn/blog",
        description: "An open bilingual dialogue language model by Tsinghua University",
    },
    Known {
        names: &["tenyxchat-7b-v1"],
        simple_name: "TenyxChat-7B",
        link: "https://huggingface.co/tenyx/TenyxChat-7B-v1",
        description: "An open model DPO trained on top of OpenChat-3.5 using Tenyx fine-tuning",
    },
    Known {
        names: &["zephyr-7b-beta", "zephyr-7b-alpha"],
        simple_name: "Zephyr",
        link: "https://huggingface.co/HuggingFaceH4/zephyr-7b-alpha",
        description: "A chatbot fine-tuned from Mistral by Hugging Face",
    },
    Known {
        names: &["notus-7b-v1"],
        simple_name: "Notus",
        link: "https://huggingface.co/argilla/notus-7b-v1",
        description: "A chatbot fine-tuned from Zephyr SFT by Argilla",
    },
    Known {
        names: &["catppt"],
        simple_name: "CatPPT",
        link: "https://huggingface.co/rishiraj/CatPPT",
        description: "A chatbot fine-tuned from a SLERP merged model by Rishiraj Acharya",
    },
    Known {
        names: &["TinyLlama"],
        simple_name: "TinyLlama",
        link: "https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        description: "The TinyLlama project is an open endeavor to pretrain a 1.1B Llama model on 3 trillion tokens.",
    },
    Known {
        names: &["codellama-70b-instruct", "codellama-34b-instruct", "codellama-13b-instruct", "codellama-7b-instruct"],
        simple_name: "Code Llama",
        link: "https://ai.meta.com/blog/code-llama-large-language-model-coding/",
        description: "Open foundation models for code by Meta",
    },
    Known {
        names: &["wizardlm-70b", "wizardlm-30b", "wizardlm-13b"],
        simple_name: "WizardLM",
        link: "https://github.com/nlpxucan/WizardLM",
        description: "An instruction-following LLM using evol-instruct by Microsoft",
    },
    Known {
        names: &["wizardcoder-15b-v1.0"],
        simple_name: "WizardLM",
        link: "https://github.com/nlpxucan/WizardLM/tree/main/WizardCoder",
        description: "Empowering Code Large Language Models with Evol-Instruct",
    },
    Known {
        names: &["mpt-7b-chat", "mpt-30b-chat"],
        simple_name: "MPT-Chat",
        link: "https://www.mosaicml.com/blog/mpt-30b",
        description: "A chatbot fine-tuned from MPT by MosaicML",
    },
    Known {
        names: &["guanaco-33b", "guanaco-65b"],
        simple_name: "Guanaco",
        link: "https://github.com/artidoro/qlora",
        description: "A model fine-tuned with QLoRA by UW",
    },
    Known {
        names: &["gpt4all-13b-snoozy"],
        simple_name: "GPT4All-Snoozy",
        link: "https://github.com/nomic-ai/gpt4all",
        description: "A finetuned LLaMA model on assistant style data by Nomic AI",
    },
    Known {
        names: &["koala-13b"],
        simple_name: "Koala",
        link: "https://bair.berkeley.edu/blog/2023/04/03/koala",
        description: "A dialogue model for academic research by BAIR",
    },
    Known {
        names: &["RWKV-4-Raven-14B"],
        simple_name: "RWKV-4-Raven",
        link: "https://huggingface.co/BlinkDL/rwkv-4-raven",
        description: "An RNN with transformer-level LLM performance",
    },
    Known {
        names: &["alpaca-13b"],
        simple_name: "Alpaca",
        link: "https://crfm.stanford.edu/2023/03/13/alpaca.html",
        description: "A model fine-tuned from LLaMA on instruction-following demonstrations by Stanford",
    },
    Known {
        names: &["oasst-pythia-12b", "oasst-sft-7-llama-30b"],
        simple_name: "OpenAssistant (oasst)",
        link: "https://open-assistant.io",
        description: "An Open Assistant for everyone by LAION",
    },
    Known {
        names: &["palm-2"],
        simple_name: "PaLM 2 Chat",
        link: "https://cloud.google.com/vertex-ai/docs/release-notes#May_10_2023",
        description: "PaLM 2 for Chat (chat-bison@001) by Google",
    },
    Known {
        names: &["llama-7b", "llama-13b"],
        simple_name: "LLaMA",
        link: "https://arxiv.org/abs/2302.13971",
        description: "Open and efficient foundation language models by Meta",
    },
    Known {
        names: &["open-llama-7b-v2-open-instruct", "open-llama-7b-open-instruct"],
        simple_name: "Open LLaMa (Open Instruct)",
        link: "https://medium.com/vmware-data-ml-blog/starter-llm-for-the-enterprise-instruction-tuning-openllama-7b-d05fc3bbaccc",
        description: "Open LLaMa fine-tuned on instruction-following data by VMware",
    },
    Known {
        names: &["dolly-v2-12b"],
        simple_name: "Dolly",
        link: "https://www.databricks.com/blog/2023/04/12/dolly-first-open-commercially-viable-instruction-tuned-llm",
        description: "An instruction-tuned open large language model by Databricks",
    },
    Known {
        names: &["stablelm-tuned-alpha-7b"],
        simple_name: "StableLM",
        link: "https://github.com/stability-AI/stableLM",
        description: "Stability AI language models",
    },
    Known {
        names: &["codet5p-6b"],
        simple_name: "CodeT5p-6b",
        link: "https://huggingface.co/Salesforce/codet5p-6b",
        description: "Code completion model released by Salesforce",
    },
    Known {
        names: &["fastchat-t5-3b", "fastchat-t5-3b-v1.0"],
        simple_name: "FastChat-T5",
        link: "https://huggingface.co/lmsys/fastchat-t5-3b-v1.0",
        description: "A chat assistant fine-tuned from FLAN-T5 by LMSYS",
    },
    Known {
        names: &["phoenix-inst-chat-7b"],
        simple_name: "Phoenix-7B",
        link: "https://huggingface.co/FreedomIntelligence/phoenix-inst-chat-7b",
        description: "A multilingual chat assistant fine-tuned from Bloomz to democratize ChatGPT across languages by CUHK(SZ)",
    },
    Known {
        names: &["realm-7b-v1"],
        simple_name: "ReaLM",
        link: "https://github.com/FreedomIntelligence/ReaLM",
        description: "A chatbot fine-tuned from LLaMA2 with data generated via iterative calls to UserGPT and ChatGPT by CUHK(SZ) and SRIBD.",
    },
    Known {
        names: &["billa-7b-sft"],
        simple_name: "BiLLa-7B-SFT",
        link: "https://huggingface.co/Neutralzz/BiLLa-7B-SFT",
        description: "An instruction-tuned bilingual LLaMA with enhanced reasoning ability by an independent researcher",
    },
    Known {
        names: &["h2ogpt-gm-oasst1-en-2048-open-llama-7b-preview-300bt-v2"],
        simple_name: "h2oGPT-GM-7b",
        link: "https://huggingface.co/h2oai/h2ogpt-gm-oasst1-en-2048-open-llama-7b-preview-300bt-v2",
        description: "An instruction-tuned OpenLLaMA with enhanced conversational ability by H2O.ai",
    },
    Known {
        names: &["baize-v2-7b", "baize-v2-13b"],
        simple_name: "Baize v2",
        link: "https://github.com/project-baize/baize-chatbot#v2",
        description: "A chatbot fine-tuned from LLaMA with ChatGPT self-chat data and Self-Disillation with Feedback (SDF) by UCSD and SYSU.",
    },
    Known {
        names: &["airoboros-l2-7b-2.1", "airoboros-l2-13b-2.1", "airoboros-c34b-2.1", "airoboros-l2-70b-2.1"],
        simple_name: "airoboros",
        link: "https://huggingface.co/jondurbin/airoboros-l2-70b-2.1",
        description: "An instruction-tuned LlaMa model tuned with 100% synthetic instruction-response pairs from GPT4",
    },
    Known {
        names: &["spicyboros-7b-2.2", "spicyboros-13b-2.2", "spicyboros-70b-2.2"],
        simple_name: "spicyboros",
        link: "https://huggingface.co/jondurbin/spicyboros-70b-2.2",
        description: "De-aligned versions of the airoboros models",
    },
    Known {
        names: &["Robin-7b-v2", "Robin-13b-v2", "Robin-33b-v2"],
        simple_name: "Robin-v2",
        link: "https://huggingface.co/OptimalScale/robin-7b-v2-delta",
        description: "A chatbot fine-tuned from LLaMA-7b, achieving competitive performance on chitchat, commonsense reasoning and instruction-following tasks, by OptimalScale, HKUST.",
    },
    Known {
        names: &["manticore-13b-chat"],
        simple_name: "Manticore 13B Chat",
        link: "https://huggingface.co/openaccess-ai-collective/manticore-13b-chat-pyg",
        description: "A chatbot fine-tuned from LlaMa across several CoT and chat datasets.",
    },
    Known {
        names: &["redpajama-incite-7b-chat"],
        simple_name: "RedPajama-INCITE-7B-Chat",
        link: "https://huggingface.co/togethercomputer/RedPajama-INCITE-7B-Chat",
        description: "A chatbot fine-tuned from RedPajama-INCITE-7B-Base by Together",
    },
    Known {
        names: &["falcon-7b", "falcon-7b-instruct", "falcon-40b", "falcon-40b-instruct", "falcon-180b", "falcon-180b-chat"],
        simple_name: "Falcon",
        link: "https://huggingface.co/tiiuae/falcon-180B",
        description: "TII's flagship series of large language models",
    },
    Known {
        names: &["tigerbot-7b-sft"],
        simple_name: "Tigerbot",
        link: "https://huggingface.co/TigerResearch/tigerbot-7b-sft",
        description: "A large-scale language model (LLM) with multiple languages and tasks.",
    },
    Known {
        names: &["internlm-chat-7b", "internlm-chat-7b-8k"],
        simple_name: "InternLM",
        link: "https://huggingface.co/internlm/internlm-chat-7b",
        description: "A multi-language large-scale language model (LLM), developed by SHLAB.",
    },
    Known {
        names: &["Qwen-7B-Chat"],
        simple_name: "Qwen",
        link: "https://huggingface.co/Qwen/Qwen-7B-Chat",
        description: "A multi-language large-scale language model (LLM), developed by Damo Academy.",
    },
    Known {
        names: &["Llama2-Chinese-13b-Chat", "LLama2-Chinese-13B"],
        simple_name: "Llama2-Chinese",
        link: "https://huggingface.co/FlagAlpha/Llama2-Chinese-13b-Chat",
        description: "A multi-language large-scale language model (LLM), developed by FlagAlpha.",
    },
    Known {
        names: &["Chinese-Alpaca-2-7B", "Chinese-Alpaca-2-13B"],
        simple_name: "Chinese-Alpaca",
        link: "https://huggingface.co/hfl/chinese-alpaca-2-13b",
        description: "New extended Chinese vocabulary beyond Llama-2, open-sourcing the Chinese LLaMA-2 and Alpaca-2 LLMs.",
    },
    Known {
        names: &["Vigogne-2-7B-Instruct", "Vigogne-2-13B-Instruct"],
        simple_name: "Vigogne-Instruct",
        link: "https://huggingface.co/bofenghuang/vigogne-2-7b-instruct",
        description: "A French large language model (LLM) optimized for instruction-following, developed by Bofeng Huang",
    },
    Known {
        names: &["Vigogne-2-7B-Chat", "Vigogne-2-13B-Chat"],
        simple_name: "Vigogne-Chat",
        link: "https://huggingface.co/bofenghuang/vigogne-2-7b-chat",
        description: "A French large language model (LLM) optimized for instruction-following and multi-turn dialogues, developed by Bofeng Huang",
    },
    Known {
        names: &["stable-vicuna-13B-HF"],
        simple_name: "stable-vicuna",
        link: "https://huggingface.co/TheBloke/stable-vicuna-13B-HF",
        description: "A Vicuna model fine-tuned using RLHF via PPO on various conversational and instructional datasets.",
    },
    Known {
        names: &["deluxe-chat-v1", "deluxe-chat-v1.1", "deluxe-chat-v1.2"],
        simple_name: "DeluxeChat",
        link: "",
        description: "Deluxe Chat",
    },
    Known {
        names: &["Xwin-LM-7B-V0.1", "Xwin-LM-13B-V0.1", "Xwin-LM-70B-V0.1", "Xwin-LM-7B-V0.2", "Xwin-LM-13B-V0.2"],
        simple_name: "Xwin-LM",
        link: "https://github.com/Xwin-LM/Xwin-LM",
        description: "Chat models developed by Xwin-LM team",
    },
    Known {
        names: &["lemur-70b-chat"],
        simple_name: "Lemur-Chat",
        link: "https://huggingface.co/OpenLemur/lemur-70b-chat-v1",
        description: "An openly accessible language model optimized for both natural language and coding capabilities ",
    },
    Known {
        names: &["Mistral-7B-OpenOrca"],
        simple_name: "Open-Orca",
        link: "https://huggingface.co/Open-Orca/Mistral-7B-OpenOrca",
        description: "A fine-tune of [Mistral 7B](https://huggingface.co/mistralai/Mistral-7B-v0.1) using [OpenOrca dataset](https://huggingface.co/datasets/Open-Orca/OpenOrca)",
    },
    Known {
        names: &["dolphin-2.2.1-mistral-7b"],
        simple_name: "dolphin-mistral",
        link: "https://huggingface.co/ehartford/dolphin-2.2.1-mistral-7b",
        description: "An uncensored fine-tuned Mistral 7B",
    },
    Known {
        names: &["AquilaChat-7B", "AquilaChat2-7B", "AquilaChat2-34B"],
        simple_name: "Aquila-Chat",
        link: "https://huggingface.co/BAAI/AquilaChat2-34B",
        description: "Chat models developed by BAAI team",
    },
    Known {
        names: &["xDAN-L1-Chat-RL-v1"],
        simple_name: "xDAN-L1-Chat",
        link: "https://huggingface.co/xDAN-AI/xDAN-L1-Chat-RL-v1",
        description: "A large language chat model created by xDAN-AI.",
    },
    Known {
        names: &["MetaMath-70B-V1.0", "MetaMath-7B-V1.0"],
        simple_name: "MetaMath",
        link: "https://huggingface.co/meta-math",
        description: "A finetune of Llama2 on [MetaMathQA](https://huggingface.co/datasets/meta-math/MetaMathQA) that specializes in mathematical reasoning.",
    },
    Known {
        names: &["Yuan2-2B-hf", "Yuan2-51B-hf", "Yuan2-102B-hf"],
        simple_name: "IEIYuan",
        link: "https://huggingface.co/IEITYuan",
        description: "A Basemodel developed by IEI.",
    },
    Known {
        names: &["llava-v1.6-vicuna-13b", "llava-v1.6-vicuna-7b", "llava-v1.5-13b", "llava-v1.5-7b"],
        simple_name: "LLaVA",
        link: "https://github.com/haotian-liu/LLaVA",
        description: "an open large language and vision assistant",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(name: &str) -> Option<String> {
        lookup(name).map(|i| i.simple_name)
    }

    #[test]
    fn one_entry_per_family_llmfs_detects() {
        let cases = [
            ("vicuna-7b-v1.3", "Vicuna"),
            ("lmsys/vicuna-7b-v1.5", "Vicuna"),
            ("llama-2-7b-chat", "Llama 2"),
            ("meta-llama/Llama-2-7b-chat-hf", "Llama 2"),
            ("meta-llama/Meta-Llama-3-8B-Instruct", "Llama 3"),
            ("mistralai/Mistral-7B-Instruct-v0.2", "Mixtral of experts"),
            ("zephyr-7b-beta", "Zephyr"),
            ("alpaca-13b", "Alpaca"),
            ("koala-13b", "Koala"),
            ("databricks/dolly-v2-12b", "Dolly"),
            ("Qwen/Qwen-7B-Chat", "Qwen"),
            ("Qwen1.5-7B-Chat", "Qwen 1.5"),
            ("TinyLlama", "TinyLlama"),
            ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama"),
            ("openchat/openchat-3.5-0106", "OpenChat 3.5"),
            ("deepseek-ai/deepseek-llm-67b-chat", "DeepSeek LLM"),
            ("tiiuae/falcon-7b-instruct", "Falcon"),
            ("google/gemma-7b-it", "Gemma"),
        ];
        for (name, want) in cases {
            assert_eq!(simple(name).as_deref(), Some(want), "{name}");
        }
    }

    #[test]
    fn fastchat_strings_are_kept() {
        let info = lookup("vicuna-13b").unwrap();
        assert_eq!(info.link, "https://lmsys.org/blog/2023-03-30-vicuna/");
        assert_eq!(info.description, "A chat assistant fine-tuned on user-shared conversations by LMSYS");
        // Registered twice in FastChat; the later call wins, as in its OrderedDict.
        assert_eq!(simple("qwen-14b-chat").as_deref(), Some("Qwen"));
    }

    #[test]
    fn case_insensitive_whole_names_only() {
        assert_eq!(simple("KOALA-13B").as_deref(), Some("Koala"));
        assert_eq!(simple("koala"), None);
        assert_eq!(simple("koala-13b-extra"), None);
        assert_eq!(simple(""), None);
        assert_eq!(simple("/"), None);
    }

    #[test]
    fn table_is_well_formed() {
        for k in FASTCHAT.iter().chain(LATER) {
            assert!(!k.names.is_empty() && !k.simple_name.is_empty());
            assert!(k.link.is_empty() || k.link.starts_with("https://"), "{}", k.link);
        }
    }
}
