"""The baseline app (../shared/baseline/app.py, on PYTHONPATH) unchanged, but answering 202 where
it answers 200, because estafeta-load counts only 202 as an acknowledgement. A pass-through ASGI
wrapper: it costs one extra coroutine per response and changes nothing else.

Run: PYTHONPATH=<baseline dir> uvicorn --app-dir scripts/bench_support baseline_202:app ...
"""
from app import app as baseline_app


async def app(scope, receive, send):
    async def send_202(message):
        if message["type"] == "http.response.start" and message.get("status") == 200:
            message = dict(message, status=202)
        await send(message)

    await baseline_app(scope, receive, send_202)
