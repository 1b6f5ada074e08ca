"""Chat templates the tests render with SmolLM2's tokenizer (no Llama model is available here)."""

# Llama 3.1 Instruct's template, its control tokens mapped onto SmolLM2's: <|start_header_id|> is
# <|im_start|>, <|end_header_id|> is <filename>, <|eot_id|> is <|im_end|>, <|python_tag|> is
# <jupyter_code>, <|eom_id|> is <jupyter_output>; `bos_token` (SmolLM2's is <|im_start|>) comes first.
LLAMA_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|im_start|>system<filename>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|im_end|>" }}
{%- if tools is not none %}
    {{- "<|im_start|>user<filename>\\n\\nGiven the following functions, reply with a JSON call.\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
    {{- "<|im_end|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|im_start|>' + message['role'] + '<filename>\\n\\n' }}
        {{- message['content'] | trim + '<|im_end|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|im_start|>assistant<filename>\\n\\n<jupyter_code>' + tool_call.name + '.call(' }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}{%- if not loop.last %}{{- ", " }}{%- endif %}
            {%- endfor %}
            {{- ")" }}
        {%- else %}
            {{- '<|im_start|>assistant<filename>\\n\\n' }}
            {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
        {%- endif %}
        {%- if builtin_tools is defined %}{{- "<jupyter_output>" }}{%- else %}{{- "<|im_end|>" }}{%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|im_start|>ipython<filename>\\n\\n" + message.content + "<|im_end|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant<filename>\\n\\n' }}{%- endif %}
"""
