"""`python -m lowprec`: a table of every format on a random tensor (bits, bytes, error)."""

import torch

from . import FORMATS, quantize


def main(shape=(1024, 1024), seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    print(f"x ~ N(0, 1), shape {tuple(shape)}, {x.numel() * 4} bytes in fp32\n")
    print(f"| {'format':<9} | {'bits':>4} | {'eff. bits':>9} | {'nbytes':>9} | {'rel. RMS error':>14} |")
    print(f"|{'-' * 11}|{'-' * 6}|{'-' * 11}|{'-' * 11}|{'-' * 16}|")
    for name, fmt in FORMATS.items():
        q = quantize(x, fmt)
        err = ((q.dequantize() - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
        print(f"| {name:<9} | {fmt.bits:>4} | {q.bits_per_element:>9.3f} | {q.nbytes:>9} | {err:>14.4e} |")


if __name__ == "__main__":
    main()
