"""AWS Bedrock through botocore: Converse, ConverseStream, SigV4, event streams.

::

    provider.py     BedrockProvider, BedrockUpstream: HTTP over the shared session
    credentials.py  static keys or botocore's chain (in a worker thread), SigV4 / bearer
    request.py      OpenAI request -> Converse request (pure)
    response.py     Converse response, stop reasons, usage and errors -> OpenAI (pure)
    stream.py       event-stream frames -> OpenAI chunks
    wire.py         the Converse wire format as msgspec Structs
"""

from __future__ import annotations

from providers.bedrock.provider import BedrockProvider, BedrockUpstream

__all__ = ["BedrockProvider", "BedrockUpstream"]
