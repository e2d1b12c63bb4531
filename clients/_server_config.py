"""What a client needs to know about the route, read from the server instead of a copy of the spec.

The route's model config carries the slice of the spec it serves (`parameters.spec`: modalities, history length,
`serving` with the route's name, `max_candidates` and the admission levels; `fusionrank.triton.render`), so a
client built from it cannot disagree with the server it talks to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from clients.errors import ServerError, UnavailableError, to_client_error
from clients.tls import ClientTls
from fusionrank.contract.errors import SpecError
from fusionrank.contract.spec import PipelineSpec, from_dict

SPEC_PARAMETER = "spec"


def spec_from_config(config: dict, model: str) -> PipelineSpec:
    """The spec a route's model config (as tritonclient's JSON) carries; ServerError when it carries none."""
    value = config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value")
    if not value:
        raise ServerError(f"model {model!r} has no {SPEC_PARAMETER!r} parameter: not a fusionrank route (pass a spec)")
    try:
        return from_dict(json.loads(value), source=f"model config of {model!r}")
    except (ValueError, SpecError) as exc:
        raise ServerError(f"model {model!r}: its {SPEC_PARAMETER!r} parameter is not a spec this client reads "
                          f"({exc})") from None


def spec_from_server(urls: Sequence[str], model: str, timeout: float = 2.0,
                     tls: ClientTls | None = None) -> PipelineSpec:
    """The route's spec from the first endpoint that answers within `timeout` seconds each."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    errors = []
    for url in urls:
        client = grpcclient.InferenceServerClient(url, **(tls.channel_kwargs() if tls else {}))
        try:
            response = client.get_model_config(model, as_json=True, client_timeout=timeout)
        except InferenceServerException as exc:
            errors.append(to_client_error(exc, url))
            continue
        finally:
            client.close()
        return spec_from_config(response.get("config", response), model)
    raise UnavailableError(f"no endpoint gave the model config of {model!r}: "
                           + "; ".join(str(e) for e in errors))
