"""``segllm-edge web``: a browser chat demo over the public API (``load``, ``session``, ``connect``).

:mod:`.conversations` holds each browser user's conversation within caps, :mod:`.app` is the
Starlette app (the page and its JSON API), :mod:`.cli` the command. No torch import here.
"""
