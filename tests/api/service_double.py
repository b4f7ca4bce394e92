"""An in-memory SessionService for testing the API app.

This is a legitimate test double for the control plane (the supervisor implements the real one):
the app's job is auth, limits, validation and the HTTP contract, all of which run for real here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from appliance.api import (
    CapacityError,
    ClientInfo,
    CreatedSession,
    IceCandidate,
    InvalidRequest,
    SessionInfo,
    SessionOptions,
)
from appliance.ratelimit import SessionCap


@dataclass
class InMemoryService:
    capacity: int = 100
    is_ready: bool = True
    retry_after_s: float = 7.0
    fail_with: BaseException | None = None
    delay: float = 0.0
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    candidates: dict[str, list[IceCandidate | None]] = field(default_factory=dict)
    created_with: list[tuple[str, SessionOptions, ClientInfo]] = field(default_factory=list)
    resume_tokens: dict[str, str] = field(default_factory=dict)  # token -> session id
    cap: SessionCap | None = None  # released when a session ends, as the real service does

    async def create(self, offer_sdp: str, options: SessionOptions, client: ClientInfo) -> CreatedSession:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        if len(self.sessions) >= self.capacity:
            raise CapacityError("all shards are full", retry_after=self.retry_after_s)
        sid = "s_" + secrets.token_urlsafe(8)
        if options.resume_token:  # the real service's ownership rules, without the Janus part
            sid = self.resume_tokens.pop(options.resume_token, "")
            old = self.sessions.get(sid)
            if old is None or old.owner != client.sub or client.session_id not in (None, sid):
                raise InvalidRequest("resume token unknown, expired or already used", code="invalid_resume")
        now = time.time()
        self.sessions[sid] = SessionInfo(sid, client.sub, "connecting", options.mode, now, now + 3600,
                                         {"voice": options.voice or "Puck"})
        self.candidates[sid] = []
        self.created_with.append((offer_sdp, options, client))
        answer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        resume = secrets.token_urlsafe(32)
        self.resume_tokens[resume] = sid
        return CreatedSession(sid, answer, resume, now + 3600)

    async def trickle(self, session_id: str, candidate: IceCandidate | None) -> None:
        self.candidates[session_id].append(candidate)

    async def get(self, session_id: str) -> SessionInfo | None:
        return self.sessions.get(session_id)

    async def delete(self, session_id: str) -> bool:
        self.candidates.pop(session_id, None)
        info = self.sessions.pop(session_id, None)
        if info is not None and self.cap is not None:
            await self.cap.release(info.owner, session_id)
        return info is not None

    def ready(self) -> bool:
        return self.is_ready

    def retry_after(self) -> float:
        return self.retry_after_s
