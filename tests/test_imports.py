"""Layering: the engine (every module under seal_jax/ outside seal_jax/tasks/) never imports a domain.

Domains import the engine, never the other way round. The check reads the source (ast), so it sees
imports inside functions too. The one exception is the CLI entry point `seal_jax/__main__.py`, which
composes an engine and a domain through the registry in `seal_jax/tasks/__init__.py`.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "seal_jax"
COMPOSITION_ROOTS = {"__main__.py"}


def module_package(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])


def imported_modules(path: pathlib.Path, package: str) -> set[str]:
    """Every module `path` imports anywhere in its body; `package` resolves relative imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def engine_modules() -> list[pathlib.Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if "tasks" not in p.relative_to(PACKAGE).parts and p.name not in COMPOSITION_ROOTS]


def test_the_engine_never_imports_a_domain():
    modules = engine_modules()
    assert {"engine.py", "rest_em.py", "estep.py", "domain.py", "experiment.py"} <= {p.name for p in modules}
    offenders = {str(p.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(p, module_package(p))
                                                            if m == "seal_jax.tasks" or m.startswith("seal_jax.tasks."))
                 for p in modules}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"engine modules import seal_jax.tasks: {offenders}"


def test_the_import_walker_sees_nested_and_relative_imports(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("def f():\n    from .tasks import knowledge\n    import seal_jax.tasks.base\n")
    found = imported_modules(sample, "seal_jax")
    assert "seal_jax.tasks" in found and "seal_jax.tasks.base" in found


def test_the_registry_picks_the_domain_from_the_config_field():
    from seal_jax import tasks
    from seal_jax.config import ConfigError, load_config

    c = load_config(str(PACKAGE.parent / "configs" / "knowledge.py") + ":demo")
    package = tasks.domain_package(c.domain)
    assert set(package.EXPERIMENT_RUNNERS) >= {"rest_em", "single_passage", "cpt", "continual"}
    assert callable(package.build_experiment)
    try:
        tasks.domain_package("chess")
    except ConfigError as e:
        assert "knowledge" in str(e)
    else:
        raise AssertionError("an unknown domain must fail with a ConfigError")
