"""`persguard rescore` reads an evaluation's samples back from its grids (the whole re-judging of a real run
is in tests/test_evaluate.py, on the run that test makes)."""
import pytest
import torch

from tools.cli import main
from tools.evaluate import save_grid
from tools.rescore import grid_samples


@pytest.mark.parametrize("n_references,n", [(5, 32), (8, 4), (9, 3)])
def test_grid_samples_gives_back_the_samples_of_an_evaluation_grid_to_8_bits(tmp_path, n_references, n):
    gen = torch.Generator().manual_seed(n)
    refs, samples = torch.rand(n_references, 3, 64, 64, generator=gen), torch.rand(n, 3, 64, 64, generator=gen)
    save_grid([refs, samples], tmp_path / "g.png")
    back = grid_samples(tmp_path / "g.png", n_references, n)
    assert back.shape == samples.shape
    assert (back - samples).abs().max() <= 0.5 / 255 + 1e-6


def test_grid_samples_refuses_a_grid_with_fewer_samples_than_the_record(tmp_path):
    save_grid([torch.rand(5, 3, 64, 64), torch.rand(8, 3, 64, 64)], tmp_path / "g.png")
    with pytest.raises(ValueError, match="g.png: holds 8 sample tiles after 5 references, the record says 16"):
        grid_samples(tmp_path / "g.png", 5, 16)


def test_rescore_names_a_folder_without_a_report(tmp_path, capsys):
    assert main(["rescore", str(tmp_path), "--evaluators", str(tmp_path), "--out", str(tmp_path / "r")]) != 0
    assert f"{tmp_path / 'report.json'}: no evaluation report" in capsys.readouterr().err

