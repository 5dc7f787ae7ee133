"""Chess endgames against Stockfish: the model plays White with king + queen (``KQK``) or king + rook
(``KRK``) against Black's lone king, and must checkmate it.

Needs ``python-chess`` (``pip install 'postrl[agents]'``) and the Stockfish binary (Debian / Ubuntu:
``apt-get install stockfish``, found on ``PATH`` or at ``/usr/games/stockfish``); without them building the
environment raises :class:`~postrl.envs.base.EnvError` saying what to install. One Stockfish process per
Python process serves every episode (Black's replies are depth-limited searches, ~ms each).

The start position is drawn from the episode's seed: a legal position with White to move in which Black
is not in check and the game is not over. Each turn the model's move is read from its text (UCI like
``d1d7``, or SAN like ``Qd7``); an illegal or unreadable move is refused with the list of legal moves and
does not count as a move; after ``max_invalid`` refusals in a row the episode ends (reward 0). Reward 1 for
checkmate; 0 for a draw (stalemate, the queen or rook lost, fifty-move rule, repetition). The state key is
the position (FEN without move counters).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import threading
from typing import Any, Optional

from .base import EnvError, TextEnv, register_env

__all__ = ["ChessEndgameEnv", "find_stockfish"]

_UCI_RE = re.compile(r"\b([a-h][1-8][a-h][1-8][qrbn]?)\b")
_ENGINES: dict[str, Any] = {}
_ENGINE_LOCK = threading.Lock()


def find_stockfish(path: Optional[str] = None) -> Optional[str]:
    """The Stockfish executable: ``path`` if given and present, else ``stockfish`` on PATH, else
    ``/usr/games/stockfish`` (where Debian installs it); None when there is none."""
    for cand in ([path] if path else []) + [shutil.which("stockfish"), "/usr/games/stockfish"]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class _Stockfish:
    """A minimal UCI client over pipes (no threads, so nothing keeps the interpreter alive at exit: the
    engine exits when its stdin closes). Shared by every episode of the process, one query at a time."""

    def __init__(self, path: str):
        self.proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._send("uci")
        self._read_until("uciok")
        self._send("isready")
        self._read_until("readyok")

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read_until(self, prefix: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EnvError("stockfish exited unexpectedly")
            if line.startswith(prefix):
                return line.strip()

    def best_move(self, fen: str, depth: int) -> str:
        self._send(f"position fen {fen}")
        self._send(f"go depth {int(depth)}")
        return self._read_until("bestmove").split()[1]

    def close(self) -> None:
        try:
            self._send("quit")
            self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001 - already gone
            self.proc.kill()


def _engine(path: str) -> _Stockfish:
    with _ENGINE_LOCK:
        eng = _ENGINES.get(path)
        if eng is None or eng.proc.poll() is not None:
            eng = _Stockfish(path)
            _ENGINES[path] = eng
            atexit.register(eng.close)
        return eng


def stockfish_move(path: str, fen: str, depth: int) -> str:
    """Stockfish's best move (UCI) in the position ``fen`` after a ``depth``-ply search."""
    eng = _engine(path)
    with _ENGINE_LOCK:
        return eng.best_move(fen, depth)


@register_env("chess_endgame")
class ChessEndgameEnv(TextEnv):
    """KQ vs K or KR vs K (``material``) against Stockfish searching ``depth`` plies (see the module
    docstring)."""

    def __init__(self, material: str = "KQK", depth: int = 5, max_invalid: int = 3,
                 stockfish_path: Optional[str] = None):
        try:
            import chess  # noqa: F401
        except ImportError:
            raise EnvError("chess_endgame needs python-chess: pip install 'postrl[agents]' (or chess)") from None
        if material not in ("KQK", "KRK"):
            raise EnvError(f"chess_endgame: material must be KQK or KRK, got {material!r}")
        path = find_stockfish(stockfish_path)
        if path is None:
            raise EnvError("chess_endgame needs the Stockfish binary: apt-get install stockfish (Debian/Ubuntu), "
                           "or pass stockfish_path; not found on PATH or at /usr/games/stockfish")
        self.material, self.depth, self.max_invalid, self.path = material, depth, max_invalid, path

    def _key(self) -> str:
        return " ".join(self.board.fen().split()[:4])

    def _reset(self, sample: Any):
        import chess

        piece = chess.QUEEN if self.material == "KQK" else chess.ROOK
        for _ in range(10_000):
            wk, wp, bk = self.rng.sample(range(64), 3)
            board = chess.Board(None)
            board.set_piece_at(wk, chess.Piece(chess.KING, chess.WHITE))
            board.set_piece_at(wp, chess.Piece(piece, chess.WHITE))
            board.set_piece_at(bk, chess.Piece(chess.KING, chess.BLACK))
            board.turn = chess.WHITE
            if board.is_valid() and not board.is_game_over() and chess.square_distance(wk, bk) > 1:
                break
        self.board = board
        self.invalid = 0
        name = "queen" if piece == chess.QUEEN else "rook"
        text = (f"You play White (king and {name}) against Black's lone king. Checkmate it.\n"
                f"{self._show()}\nYour move (UCI, e.g. {self._example()}).")
        return text, {"state_key": self._key(), "fen": board.fen()}

    def _example(self) -> str:
        return next(iter(self.board.legal_moves)).uci()

    def _show(self) -> str:
        return f"FEN: {self.board.fen()}\n{self.board}"

    def _parse(self, action: str):
        import chess

        for m in _UCI_RE.findall(action):
            try:
                move = chess.Move.from_uci(m)
            except ValueError:
                continue
            if move in self.board.legal_moves:
                return move
        for word in re.findall(r"[A-Za-z0-9=+#x-]+", action):
            try:
                return self.board.parse_san(word.rstrip("+#"))
            except ValueError:
                continue
        return None

    def _step(self, action: str):
        import chess

        move = self._parse(action)
        if move is None:
            self.invalid += 1
            legal = " ".join(sorted(m.uci() for m in self.board.legal_moves))
            if self.invalid >= self.max_invalid:
                return "Illegal move again; the game is over.", 0.0, True, \
                    {"success": False, "invalid": True, "state_key": self._key()}
            return f"Illegal or unreadable move. Legal moves: {legal}", 0.0, False, \
                {"invalid": True, "state_key": self._key()}
        self.invalid = 0
        self.board.push(move)
        if self.board.is_checkmate():
            return "Checkmate. You win.", 1.0, True, {"success": True, "state_key": self._key()}
        if self.board.is_game_over(claim_draw=True):
            return "Draw. The game is over.", 0.0, True, {"success": False, "state_key": self._key()}
        reply = chess.Move.from_uci(stockfish_move(self.path, self.board.fen(), self.depth))
        self.board.push(reply)
        if self.board.is_game_over(claim_draw=True):
            return f"Black played {reply.uci()}. Draw. The game is over.", 0.0, True, \
                {"success": False, "state_key": self._key()}
        return f"Black played {reply.uci()}.\n{self._show()}\nYour move.", 0.0, False, \
            {"state_key": self._key(), "invalid": False}
