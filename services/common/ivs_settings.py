"""Where the IVS API is: the local emulator by default, real AWS when a region is configured."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.env import ConfigError, Env

LOCAL_IVS_ENDPOINT = "http://127.0.0.1:8099"
LOCAL_REGION = "us-east-1"


@dataclass(frozen=True)
class IvsSettings:
    mode: str  # "local" or "aws"
    region: str
    endpoint_url: str | None
    local_credentials: bool


def read_mode(environ: Mapping[str, str]) -> str:
    """FANOUT_MODE if set; otherwise AWS mode exactly when an AWS region is configured."""
    env = Env(environ)
    aws_configured = bool(env.raw("AWS_REGION") or env.raw("AWS_DEFAULT_REGION"))
    return env.choice("FANOUT_MODE", "aws" if aws_configured else "local", ("local", "aws"))


def read_ivs_settings(environ: Mapping[str, str]) -> IvsSettings:
    env = Env(environ)
    mode = read_mode(environ)
    endpoint = env.str("FANOUT_IVS_ENDPOINT", "", pattern=r"https?://[^\s]+") or None
    if mode == "local":
        return IvsSettings(
            mode="local",
            region=env.str("AWS_REGION", LOCAL_REGION),
            endpoint_url=endpoint or LOCAL_IVS_ENDPOINT,
            local_credentials=True,
        )
    region = env.raw("AWS_REGION") or env.raw("AWS_DEFAULT_REGION")
    if not region:
        raise ConfigError("AWS_REGION is required when FANOUT_MODE=aws")
    return IvsSettings(mode="aws", region=region, endpoint_url=endpoint, local_credentials=False)
