"""``python -m edfkern.info``: versions, devices and the status of every backend."""
from __future__ import annotations

import platform


def report() -> str:
    import torch

    import edfkern

    lines = [
        f"edfkern   {edfkern.__version__}",
        f"python    {platform.python_version()} ({platform.machine()})",
        f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton    {triton.__version__}")
    except Exception as e:  # noqa: BLE001
        lines.append(f"triton    not importable ({type(e).__name__})")
    if torch.cuda.is_available():
        lines.append(f"cuda      {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}")
    else:
        lines.append("cuda      no CUDA device")
    lines.append(f"selection {edfkern.current_backend()!r} (EDFKERN_BACKEND / set_backend / use_backend)")
    lines.append("backends:")
    for name, info in edfkern.backends().items():
        mark = "yes" if info["available"] else "no "
        devs = ",".join(info["devices"]) or "-"
        lines.append(f"  {name:<10} {mark}  devices={devs:<9} {info['reason']}  ({info['description']})")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
