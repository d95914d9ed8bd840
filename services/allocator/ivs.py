"""The allocator's view of IVS: the signing key's public half, and CreateParticipantToken."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import Unavailable
from services.common.ivs_calls import IvsCaller, error_code

log = logging.getLogger(__name__)


def _normalized(pem: str) -> str:
    return "".join(pem.split())


class IvsTokenApi:
    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def find_public_key(self, pem: str) -> str | None:
        """The ARN of an imported public key with this material, if any."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"maxResults": 100}
            if token:
                params["nextToken"] = token
            response = await self._caller.call("ListPublicKeys", **params)
            for summary in response.get("publicKeys", []):
                described = await self._caller.call("GetPublicKey", arn=summary["arn"])
                material = described["publicKey"].get("publicKeyMaterial", "")
                if _normalized(material) == _normalized(pem):
                    return str(summary["arn"])
            token = response.get("nextToken")
            if not token:
                return None

    async def ensure_public_key(self, pem: str, name: str, reclaim_stale: bool = False) -> str:
        """Finds or imports the public key; the ARN is the `kid` of every self-signed token.

        With `reclaim_stale` (local mode only: an emulator whose keys are all ours), keys of the same
        name but other material make room when the 3-key quota is full; in AWS no key is ever deleted.
        """
        try:
            arn = await self.find_public_key(pem)
            if arn:
                return arn
            try:
                response = await self._caller.call("ImportPublicKey", publicKeyMaterial=pem, name=name)
            except ClientError as error:
                code = error_code(error)
                # Another allocator replica imported the same key a moment ago.
                if code == "ConflictException":
                    arn = await self.find_public_key(pem)
                    if arn:
                        return arn
                if code == "ServiceQuotaExceededException" and reclaim_stale:
                    await self._delete_named(name)
                    response = await self._caller.call("ImportPublicKey", publicKeyMaterial=pem, name=name)
                else:
                    raise
            arn = str(response["publicKey"]["arn"])
            log.info("imported the token signing public key as %s", arn)
            return arn
        except (ClientError, BotoCoreError) as error:
            code = error_code(error) if isinstance(error, ClientError) else "unreachable"
            raise Unavailable(f"cannot register the signing key with IVS: {code}") from error

    async def _delete_named(self, name: str) -> None:
        response = await self._caller.call("ListPublicKeys", maxResults=100)
        for summary in response.get("publicKeys", []):
            if summary.get("name") == name:
                log.warning("deleting stale local signing key %s to make room", summary["arn"])
                await self._caller.call("DeletePublicKey", arn=summary["arn"])

    async def create_participant_token(self, **params: Any) -> Mapping[str, Any]:
        try:
            response: Mapping[str, Any] = await self._caller.call("CreateParticipantToken", **params)
        except (ClientError, BotoCoreError) as error:
            code = error_code(error) if isinstance(error, ClientError) else "unreachable"
            raise Unavailable(f"IVS CreateParticipantToken failed: {code}", retry_after=1) from error
        return response
