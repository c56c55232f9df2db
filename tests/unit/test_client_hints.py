"""What agent clients send beyond the conversation (router.client_hints) and how the
prompt is rendered for them (router.prompting): Claude Code's billing line, its
cache_control breakpoints placed on tokens, mid-conversation system messages,
the tools-before-system order. Requests are the captured ones in
tests/support/captures/; the tokenizer is a real byte-level one without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrouter.router.client_hints import (BILLING_HEADER_PREFIX, PromptMarks, anthropic_marks, mark_ends,
                                          prompt_cache_key, remove_billing_header)
from kvrouter.router.prompting import ModelTokenizer, fold_system_messages
from kvrouter.router.views.anthropic import parse_messages_request
from kvrouter.router.views.responses import parse_responses_request
from tests.support.tiny_tokenizer import CHATML_TOOLS, SMOLLM2_TEMPLATE, STRICT_TEMPLATE, model_info

CAPTURES = Path(__file__).parent.parent / "support" / "captures"


def capture(name: str) -> dict:
    return json.loads((CAPTURES / name).read_text())["body"]


def claude_body() -> dict:
    return capture("claude_code_2.1.197.json")


def test_billing_line_removed_from_claude_codes_system_blocks():
    body = claude_body()
    assert body["system"][0]["text"].startswith(BILLING_HEADER_PREFIX)
    system, removed = remove_billing_header(body["system"])
    assert removed and len(system) == len(body["system"]) - 1  # the block held only that line
    assert system == body["system"][1:]
    assert body["system"][0]["text"].startswith(BILLING_HEADER_PREFIX)  # the request itself is not modified


def test_billing_line_rule_is_narrow():
    line = "x-anthropic-billing-header: cc_version=2.1.197.a1f; cc_entrypoint=cli;"
    assert remove_billing_header(line + "\nYou are helpful.") == ("You are helpful.", True)
    blocks = [{"type": "text", "text": line + "\nRest", "cache_control": {"type": "ephemeral"}}]
    assert remove_billing_header(blocks) == ([{"type": "text", "text": "Rest", "cache_control": {"type": "ephemeral"}}],
                                             True)
    for untouched in ("Intro\n" + line, " " + line, "X-Anthropic-Billing-Header: x", "x-anthropic-billing-header x",
                      [{"type": "text", "text": "Intro\n" + line}], None, [{"type": "image", "text": line}]):
        assert remove_billing_header(untouched) == (untouched, False)


def test_claude_codes_breakpoints_are_listed_in_request_order():
    body = claude_body()
    system, _ = remove_billing_header(body["system"])
    marks = anthropic_marks(system, body["messages"], body["tools"])
    marked = [text for text, m in marks.texts if m]
    assert marks.count == 3 and marks.tool_names == () and marks.unplaceable == 0
    assert marked[0].startswith("You are a Claude agent") and "gitStatus:" in marked[1]
    assert marked[2] == "Say hi"  # the last user message's last block


def test_marks_of_tool_results_tools_and_unplaceable_blocks():
    cc = {"cache_control": {"type": "ephemeral"}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}, **cc}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "out"}], **cc}]},
    ]
    marks = anthropic_marks("sys", messages, [{"name": "Bash", **cc}, {"name": "Read"}])
    assert marks.texts == (("sys", False), ("go", False), ("out", True))
    assert marks.tool_names == ("Bash",) and marks.unplaceable == 1 and marks.count == 3
    assert not PromptMarks() and marks


def test_mark_ends_follow_the_request_order():
    text = "<s>A sys</s><u>hello hello</u><s>hello</s>"
    marks = PromptMarks((("A sys", True), ("hello hello", False), ("hello", True), ("absent", True)))
    ends, missing = mark_ends(text, marks)
    assert ends == [8, 38] and missing == 1  # the second "hello" is found after the user block


def test_trimmed_block_is_found():
    assert mark_ends("<u>x</u>", PromptMarks((("x\n", True),))) == ([4], 0)


def test_prompt_cache_key():
    assert prompt_cache_key(capture("codex_0.171.0.json")) == "01a23445-90a1-7a50-9de0-7249120f8387"
    assert prompt_cache_key({"prompt_cache_key": 3}) == prompt_cache_key({}) == prompt_cache_key([]) == ""


def test_fold_system_messages():
    msgs = [{"role": "system", "content": "top"}, {"role": "user", "content": "hi"},
            {"role": "system", "content": "late"}]
    folded, n = fold_system_messages(msgs)
    assert n == 1 and folded == [msgs[0], {"role": "user", "content": "hi\n\n<system-reminder>\nlate\n</system-reminder>"}]
    assert msgs[1]["content"] == "hi"  # not modified
    after_assistant = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "system", "content": "s"}, {"role": "user", "content": "c"}]
    folded, n = fold_system_messages(after_assistant)
    assert n == 1 and folded[2] == {"role": "user", "content": "<system-reminder>\ns\n</system-reminder>\n\nc"}
    folded, _ = fold_system_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "system", "content": "s"}])
    assert folded[-1] == {"role": "user", "content": "<system-reminder>\ns\n</system-reminder>"}


def test_mid_conversation_system_is_a_turn_or_folded_by_what_the_template_accepts():
    msgs = [{"role": "system", "content": "top"}, {"role": "user", "content": "hi"},
            {"role": "system", "content": "late"}]
    smol = ModelTokenizer(model_info(SMOLLM2_TEMPLATE))
    assert smol.traits.system_midway
    p = smol.chat_prompt(msgs)
    assert p.systems_folded == 0 and "<|im_start|>system\nlate<|im_end|>" in p.text
    strict = ModelTokenizer(model_info(STRICT_TEMPLATE))
    assert not strict.traits.system_midway
    p = strict.chat_prompt(msgs)
    assert p.systems_folded == 1
    assert "<|im_start|>user\nhi\n\n<system-reminder>\nlate\n</system-reminder><|im_end|>" in p.text


def claude_prompt(tokenizer, tools_first=False, body=None):
    body = body or claude_body()
    system, _ = remove_billing_header(body["system"])
    marks = anthropic_marks(system, body["messages"], body["tools"])
    req = parse_messages_request({**body, "system": system}, None)
    return tokenizer.chat_prompt(req.messages, req.tools, marks, tools_first=tools_first)


def text_at(prompt, pos: int, tokenizer) -> str:
    return tokenizer.decode(prompt.tokens[:pos])


def test_claude_code_hints_land_at_the_ends_of_its_marked_blocks():
    tok = ModelTokenizer(model_info(SMOLLM2_TEMPLATE))
    p = claude_prompt(tok)
    assert len(p.hint_tokens) == 3 and p.hints_unplaced == 0
    first, system_end, user_end = (text_at(p, h, tok) for h in p.hint_tokens)
    assert first.endswith("Claude Agent SDK.") and system_end.endswith("init")  # the last line of git status
    assert user_end.endswith("Say hi")
    assert p.hint_tokens[1] < p.anchor_tokens < p.hint_tokens[2]  # the anchor: after the system turn's end token


def test_tools_before_system_keeps_tools_ahead_of_the_environment_block():
    tok = ModelTokenizer(model_info(CHATML_TOOLS))
    assert tok.traits.tools_first
    plain, first = claude_prompt(tok), claude_prompt(tok, tools_first=True)
    assert not plain.tools_first and first.tools_first
    # the model's order: system text (ending with git status) first, then every tool
    assert plain.text.index("gitStatus:") < plain.text.index('"name": "Bash"')
    # tools first: every tool, then the system text
    assert first.text.index('"name": "Write"') < first.text.index("You are a Claude agent") < \
        first.text.index("gitStatus:")
    # Claude Code's first marked block now ends after the tools and before the environment: a position
    # that survives a git commit
    hint = first.hint_tokens[0]
    before = text_at(first, hint, tok)
    assert '"name": "Write"' in before and "gitStatus:" not in before and before.endswith("Claude Agent SDK.")


def test_a_commit_keeps_the_tools_first_prefix_and_costs_the_models_order_its_tools():
    tok = ModelTokenizer(model_info(CHATML_TOOLS))
    body = claude_body()
    committed = json.loads(json.dumps(body))
    committed["system"][2]["text"] = committed["system"][2]["text"].replace(
        "Recent commits:\n", "Recent commits:\n0a1b2c3 add notes\n")
    for tools_first in (False, True):
        a, b = claude_prompt(tok, tools_first, body), claude_prompt(tok, tools_first, committed)
        shared = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
        if tools_first:
            assert shared >= a.hint_tokens[0]  # the hint checkpoint (tools + stable system) still matches
        else:
            assert shared < a.text.index('"name": "Agent"')  # diverges before the first tool


def test_tool_breakpoint_lands_after_that_tool():
    tok = ModelTokenizer(model_info(CHATML_TOOLS))
    cc = {"cache_control": {"type": "ephemeral"}}
    body = {"model": "m", "max_tokens": 5, "system": "sys",
            "tools": [{"name": "A", "input_schema": {"type": "object"}, **cc},
                      {"name": "B", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "hi"}]}
    marks = anthropic_marks(body["system"], body["messages"], body["tools"])
    req = parse_messages_request(body, None)
    p = tok.chat_prompt(req.messages, req.tools, marks)
    (hint,) = p.hint_tokens
    before = text_at(p, hint, tok)
    assert '"name": "A"' in before and '"name": "B"' not in before
    # a template that renders no tools places nothing
    p = ModelTokenizer(model_info(SMOLLM2_TEMPLATE)).chat_prompt(req.messages, req.tools, marks)
    assert p.hint_tokens == () and p.hints_unplaced == 1


def test_codex_request_renders_and_keeps_its_key_out_of_the_prompt():
    body = capture("codex_0.171.0.json")
    req = parse_responses_request(body, 512, None)
    p = ModelTokenizer(model_info(SMOLLM2_TEMPLATE)).chat_prompt(req.messages, req.tools)
    assert prompt_cache_key(body) not in p.text
    assert 0 < p.anchor_tokens < len(p.tokens)


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, CHATML_TOOLS, STRICT_TEMPLATE])
def test_hints_are_exact_token_prefixes(template):
    tok = ModelTokenizer(model_info(template))
    p = claude_prompt(tok)
    for h in p.hint_tokens:
        assert 0 < h < len(p.tokens)
        assert p.text.startswith(tok.decode(p.tokens[:h]))


def test_token_positions_from_one_turn_equal_the_whole_texts():
    from tests.support.tiny_tokenizer import trained_model_info

    body = claude_body()
    corpus = [b["text"] for b in body["system"]] + [json.dumps(t) for t in body["tools"]]
    tok = ModelTokenizer(trained_model_info(corpus, CHATML_TOOLS))
    p = claude_prompt(tok)
    enc = tok._tok.backend_tokenizer.encode(p.text, add_special_tokens=False)
    assert tuple(enc.ids) == p.tokens
    ends = [end for _, end in enc.offsets]
    offsets = list(range(0, len(p.text), 97)) + [p.text.index("gitStatus:"), len(p.text) - 1]
    straddled = 0
    for c in offsets:
        expect = sum(1 for e in ends if e <= c)
        got = tok.positions.positions(p.text, p.tokens, [c])
        assert got == ((expect,) if 0 < expect < len(p.tokens) else ()), c
        straddled += not any(e == c for e in ends)
    assert straddled > len(offsets) // 2  # most offsets fall inside a multi-character token
    # the hints of a Claude Code request: the same through one turn as through the whole text
    assert p.hint_tokens == tuple(sorted({sum(1 for e in ends if e <= c)
                                          for c in mark_ends(p.text, anthropic_marks(
                                              remove_billing_header(body["system"])[0], body["messages"],
                                              body["tools"]))[0]}))


def test_the_flag_keeps_the_billing_line_and_the_route_header_says_when_it_was_removed():
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from kvrouter.router.config import RouterConfig
    from kvrouter.router.keys import ROUTER_CONFIG
    from kvrouter.router.views.anthropic import _client_view
    from kvrouter.router.views.common import route_header

    def view(keep: bool):
        app = web.Application()
        app[ROUTER_CONFIG] = RouterConfig(keep_billing_header=keep)
        return _client_view(make_mocked_request("POST", "/v1/messages", app=app), claude_body())

    body, notes, marks = view(False)
    assert notes == ("billing-header",) and not body["system"][0]["text"].startswith(BILLING_HEADER_PREFIX)
    assert marks.count == 3
    body, notes, _ = view(True)
    assert notes == () and body["system"][0]["text"].startswith(BILLING_HEADER_PREFIX)

    class Route:
        def header(self):
            return "worker=w0; source=none; cached=0; predicted_ttft_ms=5"

    assert route_header(Route(), ("billing-header",)).endswith("; normalised=billing-header")
    assert route_header(Route()) == Route().header()
