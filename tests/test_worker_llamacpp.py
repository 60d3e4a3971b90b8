

@pytest.fixture(scope="module")
def chatml_worker() -> Iterator[WorkerProcess]:
    yield from own_worker(model_alias="builtin", parallel=1, chat_template="llama3")


def test_builtin_chat_template_overrides_the_ggufs(chatml_worker: WorkerProcess) -> None:
    """A llama.cpp built-in name: llama.cpp's own formatter renders chat and /apply-template
    (SmolLM2's ChatML replaced by Llama 3's headers), /props names it, tools go generic."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with chatml_worker.client() as c:
        prompt = c.post("/apply-template", json={"messages": msgs}).json()["prompt"]
        assert "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" in prompt
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and "<|im_start|>" not in prompt
        assert c.get("/props").json()["chat_template"] == "llama3"
        assert c.get("/health").json()["params"]["tool_format"] == "generic"
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text
