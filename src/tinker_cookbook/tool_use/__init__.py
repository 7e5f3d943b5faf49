"""Tool use: typed Python tools (``tools``), the text format the model calls them in
(``format``, Hermes/Qwen-style ``<tool_call>`` JSON), multi-turn RL environments (``env``), and a
supervised warm-up on scripted demonstrations that teaches the format before RL (``warmup``).

>>> @tool
... def add(a: int, b: int) -> int:
...     '''Add two integers.'''
...     return a + b
>>> env = build_tool_env([add], renderer, reward_fn, "What is 2 + 3?")   # doctest: +SKIP
"""

from tinker_cookbook.tool_use.env import (
    RewardFn,
    ToolDataset,
    ToolEnv,
    ToolEnvConfig,
    ToolGroupBuilder,
    ToolTask,
    build_tool_env,
)
from tinker_cookbook.tool_use.format import (
    ToolCallParseError,
    final_answer_text,
    format_tool_call,
    parse_tool_calls,
    tool_response_message,
    tools_system_prompt,
)
from tinker_cookbook.tool_use.tools import (
    FunctionTool,
    Tool,
    ToolCall,
    ToolResult,
    function_schema,
    handle_tool_call,
    tool,
    validate_arguments,
)
from tinker_cookbook.tool_use.warmup import ConversationsBuilder, demonstration, supervised_warmup

__all__ = [
    "ConversationsBuilder",
    "FunctionTool",
    "RewardFn",
    "Tool",
    "ToolCall",
    "ToolCallParseError",
    "ToolDataset",
    "ToolEnv",
    "ToolEnvConfig",
    "ToolGroupBuilder",
    "ToolResult",
    "ToolTask",
    "build_tool_env",
    "demonstration",
    "final_answer_text",
    "format_tool_call",
    "function_schema",
    "handle_tool_call",
    "parse_tool_calls",
    "supervised_warmup",
    "tool",
    "tool_response_message",
    "tools_system_prompt",
    "validate_arguments",
]
