"""Model cards with valid Hub front matter, rendered by huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path


def source_license(folder: Path) -> str | None:
    """The ``license`` from the source model's card front matter, when it has one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a hand-written README without front matter is fine
        return None


def render_card(*, title: str, body: str, base_model, relation: str | None, tags: list[str],
                license: str | None = None, library_name: str = "transformers") -> str:
    """A README.md with YAML front matter the Hub understands.

    Example:
        >>> print(render_card(title="x", body="hi", base_model="a/b", relation=None, tags=["moe"]))  # doctest: +ELLIPSIS
        ---
        ...
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base_model,
        library_name=library_name,
        license=license,
        tags=sorted(set(["moe", "moekit", *tags])),
        pipeline_tag="text-generation",
        base_model_relation=relation,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n"))


def fenced(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
