"""Print the project's module graph at package level: who imports whom, and how often.

    .venv/bin/python tools/module_graph.py [ROOT]

ROOT (default: this checkout) is a checkout to read, so two commits can be compared. Every
import counts, lazy and `TYPE_CHECKING` ones included (what import-linter checks too). Then
the import cycles between modules inside each package, if any.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import grimp

PACKAGES = ("kernel", "core", "billing", "cluster", "serve_app", "agent_bootstrap", "darkgpu")


def main(root: Path) -> None:
    sys.path.insert(0, str(root))
    present = [p for p in PACKAGES if (root / p / "__init__.py").exists()]
    graph = grimp.build_graph(*present, cache_dir=None)
    arrows: Counter[tuple[str, str]] = Counter()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = module.split(".")[0], imported.split(".")[0]
            if a != b:
                arrows[a, b] += len(graph.get_import_details(importer=module, imported=imported))
    print(f"packages: {', '.join(present)}")
    for package in present:
        out = sorted((b, n) for (a, b), n in arrows.items() if a == package)
        print(f"  {package:16} -> " + (", ".join(f"{b} ({n})" for b, n in out) or "nothing"))
    both = sorted({tuple(sorted(k)) for k in arrows if (k[1], k[0]) in arrows})
    print("packages importing each other: " + (", ".join(" <-> ".join(p) for p in both) or "none"))
    for package in present:
        modules = sorted(m for m in graph.find_children(package))
        for i, a in enumerate(modules):
            for b in modules[i + 1 :]:
                if graph.chain_exists(a, b, as_packages=True) and graph.chain_exists(
                    b, a, as_packages=True
                ):
                    print(f"  cycle: {a} <-> {b}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
