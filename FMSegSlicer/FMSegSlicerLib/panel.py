"""The FMSeg panel's behaviour, apart from MRML and networking: wiring, enabling, tables, progress and errors.

``PanelController(ui, logic, qt, hooks)`` drives the widgets of ``Resources/UI/FMSegSlicer.ui``:

- ``ui``: an object with the panel's child widgets as attributes (``slicer.util.childWidgetVariables``);
- ``logic``: the Logic (``FMSegSlicerLib.logic.FMSegLogic``). Nothing that may take time runs on the GUI thread.
  A Logic method with an ``*_async`` variant is called through it: the variant reads the scene now, talks to the
  worker on the Logic's background thread and returns a ``Pending``; other calls go through
  ``logic.submit(function, ...)``, which returns a ``concurrent.futures.Future``. A ``qt.QTimer`` polls ``done()``
  and calls ``result()`` on the GUI thread (a ``Pending`` writes its result into the scene then). Progress
  callbacks (one ``FMSegCore.progress.Progress`` each) run on the worker thread and only store it, for the timer
  to display. Runs that need the worker connect first (a "connect" job with the panel's URL, token and device),
  then start;
- ``qt``: PythonQt's ``qt`` module in Slicer, a PySide6 namespace in the tests;
- ``hooks``: the scene side (``PanelHooks``): node names and segments, prompt ROI nodes, place mode, file
  dialogs, error dialogs. The Slicer module passes a subclass.

The code must run under PythonQt and under PySide6 with ``true_property``: Qt properties are read and written as
attributes (``button.enabled = False``, ``label.text``, ``table.rowCount = 2``), signals are connected with
``signal.connect(slot)``, property getters are never called (``.text()`` fails in PythonQt) and property setters
are not called either (PySide6 hides them with ``true_property``). Slots take ``*_args``: PythonQt and PySide6
pass different argument counts for overloaded signals such as ``currentNodeChanged``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from FMSegCore.options import InContext, bounds
from FMSegCore.progress import Progress
from FMSegCore.zoo import families

LOG = logging.getLogger(__name__)

#: Job slots: one job at a time per slot. Adaptation may run while prompts and in-context runs go on.
CONNECT, DOWNLOAD, PROMPT, INCONTEXT, ADAPTER = "connect", "download", "prompt", "incontext", "adapter"
INSTALL = "install"

DEFAULT_SEGMENT_NAME = "Segment_1"
#: The tools placed in the views, by kind: 2D box, 3D ROI, include/exclude scribble (curve), include/exclude lasso
#: (closed curve); the .ui's checkable button of each.
PLACING_BUTTONS = {"box": "boxButton", "roi": "roiButton", "scribble": "scribbleButton",
                   "exclude-scribble": "excludeScribbleButton", "lasso": "lassoButton",
                   "exclude-lasso": "excludeLassoButton"}
PLACING_NAMES = {"box": "a box", "roi": "a ROI", "scribble": "a scribble", "exclude-scribble": "an exclude scribble",
                 "lasso": "a lasso", "exclude-lasso": "an exclude lasso"}
STATUS_LIMIT = 240


def one_line(text, limit: int = STATUS_LIMIT) -> str:
    """The first non-empty line of ``text``, whitespace collapsed, cut to ``limit`` characters."""
    for line in str(text).splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "\u2026"
    return ""


def is_cancellation(exc: BaseException) -> bool:
    """A job ended because it was cancelled: the Logic's ``Cancelled`` or a Future cancelled before it ran."""
    return type(exc).__name__ in ("Cancelled", "CancelledError")


class Cancelled(Exception):
    """A job cancelled after connecting, before its function ran (same class name as the Logic's)."""


def describe_adapter(info) -> str:
    """One line about an adapter from what ``adapt``/``load_adapter`` returned (tolerant of its shape)."""
    if info is None:
        return "No adapter loaded."
    if not isinstance(info, dict):
        return one_line(f"Adapter: {info}")
    parts = []
    structures = info.get("structures")
    if structures:
        names = [s.get("name", s.get("id", "?")) if isinstance(s, dict) else str(s) for s in structures]
        parts.append(", ".join(names))
    for key, suffix in (("method", ""), ("mode", " mode")):
        if info.get(key):
            parts.append(f"{info[key]}{suffix}")
    dice = info.get("validation_dice")
    if isinstance(dice, (int, float)) and not isinstance(dice, bool):
        parts.append(f"validation Dice {dice:.3f}")
    elif isinstance(dice, dict) and dice:
        values = ", ".join(
            f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in dice.items()
        )
        parts.append(f"validation Dice {values}")
    source = info.get("path")
    if source:
        parts.append(f"from {source}")
    return one_line("Adapter: " + ("; ".join(parts) if parts else "ready"), limit=400)


def describe_task(info) -> str:
    """One line about a task from what ``load_task``/``save_task`` returned (tolerant of its shape)."""
    if not info:
        return "No task loaded: in-context runs use the support set."
    if not isinstance(info, dict):
        return one_line(f"Task: {info}")
    classes = info.get("classes") or ()
    names = [str(c.get("name", c.get("value", "?"))) if isinstance(c, dict) else str(c) for c in classes]
    parts = [", ".join(names) if names else "no class"]
    details = []
    if info.get("model"):
        details.append(str(info["model"]))
    references = info.get("references")
    if isinstance(references, int) and not isinstance(references, bool):
        details.append(f"{references} reference{'s' if references != 1 else ''}")
    if details:
        parts.append(f"({', '.join(details)})")
    if info.get("path"):
        parts.append(f"from {info['path']}")
    return one_line("Task: " + " ".join(parts), limit=400)


def model_cards(models) -> list[dict]:
    """Zoo cards as dicts with "id", "kind", "dims", "stochastic", "available" (strings are taken as ids of unknown
    kind)."""
    cards = []
    for entry in models or ():
        if isinstance(entry, dict) and entry.get("id"):
            cards.append({"id": str(entry["id"]), "kind": entry.get("kind"), "dims": entry.get("dims"),
                          "stochastic": bool(entry.get("stochastic")), "available": entry.get("available")})
        elif isinstance(entry, str) and entry:
            cards.append({"id": entry, "kind": None, "dims": None, "stochastic": False, "available": None})
    return cards


class PanelHooks:
    """What the controller asks of the scene and of the application. The defaults work without Slicer; the
    module overrides what needs MRML nodes or dialogs."""

    def describePair(self, volume, segmentation):
        """(volume name, segmentation name, segment IDs, segment names) of a volume/segmentation pair, read with
        the MRML API (``GetName``, ``GetSegmentation``)."""
        ids, names = [], []
        segments = segmentation.GetSegmentation() if segmentation is not None else None
        if segments is not None:
            for index in range(segments.GetNumberOfSegments()):
                ids.append(segments.GetNthSegmentID(index))
                names.append(segments.GetNthSegment(index).GetName())
        return _node_name(volume), _node_name(segmentation), ids, names

    def promptRois(self):
        """ROI nodes (2D boxes and 3D ROIs) to send with the next prompt."""
        return []

    def promptCurves(self):
        """(include, exclude) curve and closed curve nodes (scribbles, lassos) to send with the next prompt."""
        return [], []

    def setPlacing(self, kind: str, enabled: bool) -> None:
        """Start or stop placing a prompt of ``kind`` (a key of ``PLACING_BUTTONS``: "box" 2D, "roi" 3D, "scribble",
        "exclude-scribble", "lasso", "exclude-lasso") in the views."""

    def clearPrompts(self) -> None:
        """Remove the points, boxes and ROIs used as prompts."""

    def showError(self, title: str, text: str) -> None:
        """Show an error in full (a message box in Slicer). The status line shows its first line."""

    def chooseAdapterPath(self, save: bool) -> str:
        """A file path for saving (``save``) or loading an adapter; "" when the user cancels."""
        return ""

    def chooseTaskPath(self, save: bool) -> str:
        """A file path for saving (``save``; the dialog has asked about replacing a file) or loading a task file
        (``.fmseg-task``); "" when the user cancels."""
        return ""

    def chooseWeightsPath(self, model: str) -> str:
        """A checkpoint file to install as ``model``'s weights (the dialog names the model); "" when the user
        cancels."""
        return ""

    def confirm(self, title: str, text: str) -> bool:
        """Ask the user a question (OK/Cancel); False: cancel."""
        return False

    def confirmInstall(self, text: str) -> bool:
        """Ask the user whether to install missing packages (``text`` says which); False: do not."""
        return False

    def resultReady(self, kind: str, result) -> None:
        """A run of ``kind`` ("prompt", "incontext", "adapter-segment") wrote ``result`` into the scene."""


def _node_name(node) -> str:
    if node is None:
        return ""
    name = node.GetName() if hasattr(node, "GetName") else None
    return str(name) if name else str(node)


class _Job:
    """A running request: its Future (or the Logic's Pending), cancel flag, and the latest progress reported."""

    def __init__(self, slot, label, onDone, cancellable, progressBar, formatter):
        self.slot = slot
        self.label = label
        self.onDone = onDone
        self.cancelEvent = threading.Event() if cancellable else None
        self.progressBar = progressBar
        self.formatter = formatter
        self.future = None
        self.progress = None  # the latest Progress reported, set by the worker thread
        self.shown = None
        self.started = time.monotonic()

    @property
    def cancellable(self) -> bool:
        return self.cancelEvent is not None

    def report(self, update: Progress) -> None:
        """The progress callback given to the Logic: runs on the worker thread, only stores the update."""
        self.progress = update

    def cancelled(self) -> bool:
        return self.cancelEvent is not None and self.cancelEvent.is_set()


def _short(update: Progress) -> Progress:
    return dataclasses.replace(update, message=one_line(update.message, limit=120))


def _steps_text(update: Progress) -> str:
    """Adaptation: "step 30/150, loss 0.5000: training (lora), 40 s left"."""
    text = _short(update).describe()
    return f"step {text}" if update.total else text


def _count_text(update: Progress) -> str:
    """In-context and automatic runs: "3/12: liver, 20 s left"."""
    return _short(update).describe()


def _percent_text(update: Progress) -> str:
    """Downloads: "sam-med3d 25 %, 2 min left"; the worker's units are not assumed, the share is shown."""
    fraction = update.fraction
    share = f"{100.0 * fraction:.0f} %" if fraction is not None else ""
    text = " ".join(part for part in (one_line(update.message, limit=120), share) if part)
    left = update.left()
    return f"{text}, {left}" if text and left else text or left


class PanelController:
    """The panel's behaviour. Public methods are the actions (buttons, shortcuts, scene observers call them)."""

    def __init__(self, ui, logic, qt, hooks=None, pollIntervalMs: int = 100):
        self.ui = ui
        self.logic = logic
        self.qt = qt
        self.hooks = hooks if hooks is not None else PanelHooks()
        self.jobs = {}  # slot -> _Job
        self.connection = None  # what logic.connect returned, once connected
        self.models = {}  # model id -> card
        self.supports = []  # [(volume node, segmentation node)]
        self.cases = []
        self.adapter = None  # info of the trained or loaded adapter
        self.task = None  # info of the loaded task (3-D in-context models): in-context runs use it until cleared
        self.promptPending = False  # a prompt changed while a prompt job ran: segment again after it
        self._afterConnect = []  # requests waiting for the connect job
        self._polling = False
        self._syncingPlacing = False
        self.timer = qt.QTimer()
        self.timer.interval = int(pollIntervalMs)
        self.timer.timeout.connect(self.poll)
        # the candidates' range is the in-context option's (FMSegCore.options), as the CLI's and the worker's
        self.ui.candidatesSpinBox.minimum, self.ui.candidatesSpinBox.maximum = bounds(InContext, "candidates")
        self.ui.candidatesSpinBox.value = InContext.candidates
        self._connectSignals()
        self.updateButtons()

    # ------------------------------------------------------------------------------------------------------------
    # Wiring

    def _connectSignals(self) -> None:
        ui = self.ui
        for selector in (ui.inputVolumeSelector, ui.segmentationSelector, ui.supportVolumeSelector,
                         ui.supportSegmentationSelector, ui.caseVolumeSelector, ui.caseSegmentationSelector):
            selector.currentNodeChanged.connect(self.updateButtons)
        ui.promptModelSelector.currentIndexChanged.connect(self.updateButtons)
        ui.incontextModelSelector.currentIndexChanged.connect(self.updateButtons)
        ui.serverUrlEdit.textChanged.connect(self._connectionSettingsChanged)
        ui.serverTokenEdit.textChanged.connect(self._connectionSettingsChanged)
        ui.deviceSelector.currentIndexChanged.connect(self._connectionSettingsChanged)
        ui.connectButton.clicked.connect(self.connectWorker)
        ui.downloadModelButton.clicked.connect(self.downloadModels)
        ui.importWeightsButton.clicked.connect(self.importWeights)
        for kind, name in PLACING_BUTTONS.items():
            getattr(ui, name).toggled.connect(lambda *_args, kind=kind: self._onPlacingToggled(kind))
        ui.segmentButton.clicked.connect(self.segment)
        ui.undoButton.clicked.connect(self.undo)
        ui.clearPromptsButton.clicked.connect(self.clearPrompts)
        ui.addSupportButton.clicked.connect(self.addSupport)
        ui.removeSupportButton.clicked.connect(self.removeSupport)
        ui.runInContextButton.clicked.connect(self.runInContext)
        ui.saveTaskButton.clicked.connect(self.saveTask)
        ui.loadTaskButton.clicked.connect(self.loadTask)
        ui.clearTaskButton.clicked.connect(self.clearTask)
        ui.addCaseButton.clicked.connect(self.addCase)
        ui.removeCaseButton.clicked.connect(self.removeCase)
        ui.adaptButton.clicked.connect(self.adapt)
        ui.cancelButton.clicked.connect(self.cancel)
        ui.saveAdapterButton.clicked.connect(self.saveAdapter)
        ui.loadAdapterButton.clicked.connect(self.loadAdapter)
        ui.segmentWithAdapterButton.clicked.connect(self.segmentWithAdapter)

    # ------------------------------------------------------------------------------------------------------------
    # State

    def isRunning(self, slot: str) -> bool:
        return slot in self.jobs

    def connecting(self) -> bool:
        """A job is (re)connecting to the worker: the other runs wait for it."""
        return CONNECT in self.jobs

    def inputs(self):
        return self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode()

    def updateButtons(self, *_args) -> None:
        ui = self.ui
        volume, segmentation = self.inputs()
        hasInputs = volume is not None and segmentation is not None
        connecting = self.connecting()
        adapterBusy = self.isRunning(ADAPTER)
        ui.connectButton.enabled = not self.jobs
        ui.downloadModelButton.enabled = not connecting and not self.isRunning(DOWNLOAD)
        ui.importWeightsButton.enabled = not connecting and not self.isRunning(DOWNLOAD)
        ui.segmentButton.enabled = bool(hasInputs and not self.isRunning(PROMPT) and not connecting)
        ui.undoButton.enabled = bool(segmentation is not None and not self.isRunning(PROMPT))
        ui.addSupportButton.enabled = bool(ui.supportVolumeSelector.currentNode() is not None
                                           and ui.supportSegmentationSelector.currentNode() is not None)
        ui.removeSupportButton.enabled = bool(self.supports)
        incontextBusy = self.isRunning(INCONTEXT)
        ui.runInContextButton.enabled = bool(hasInputs and (self.supports or self.task) and not incontextBusy
                                             and not connecting)
        ui.saveTaskButton.enabled = bool(self.supports and self.modelDims(ui.incontextModelSelector.currentText) == 3
                                         and not incontextBusy and not connecting)
        ui.loadTaskButton.enabled = bool(not incontextBusy and not connecting)
        # candidates: stochastic models only (as the worker's card says), from a support set (a task draws none)
        ui.candidatesSpinBox.enabled = bool(self.isStochastic(ui.incontextModelSelector.currentText) and not self.task)
        ui.clearTaskButton.enabled = bool(self.task and not incontextBusy)
        ui.addCaseButton.enabled = bool(ui.caseVolumeSelector.currentNode() is not None
                                        and ui.caseSegmentationSelector.currentNode() is not None)
        ui.removeCaseButton.enabled = bool(self.cases)
        ui.adaptButton.enabled = bool(self.cases and not adapterBusy and not connecting)
        ui.cancelButton.enabled = any(job.cancellable and not job.cancelled() for job in self.jobs.values())
        ui.saveAdapterButton.enabled = bool(self.adapter is not None and not adapterBusy)
        ui.loadAdapterButton.enabled = bool(not adapterBusy and not connecting)
        ui.segmentWithAdapterButton.enabled = bool(hasInputs and self.adapterFor("auto") and not adapterBusy
                                                   and not connecting)
        ui.promptAdapterCheckBox.enabled = self.adapterFor("prompt")

    def modelDims(self, modelId) -> int | None:
        """2 or 3 as the worker's card of ``modelId`` says (None: unknown, e.g. before connecting)."""
        dims = (self.models.get(str(modelId)) or {}).get("dims")
        return dims if isinstance(dims, int) and not isinstance(dims, bool) else None

    def isStochastic(self, modelId) -> bool:
        """The worker's card of ``modelId`` says it draws candidate segmentations (tyche)."""
        return bool((self.models.get(str(modelId)) or {}).get("stochastic"))

    def adapterFor(self, mode: str) -> bool:
        """An adapter is loaded for ``mode``: "auto" (segments by itself) or "prompt" (helps prompts); an adapter
        whose info does not say is taken for both."""
        if self.adapter is None:
            return False
        actual = self.adapter.get("mode") if isinstance(self.adapter, dict) else None
        return actual in (None, "", mode)

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = one_line(text)

    def reportError(self, label: str, exc: BaseException) -> None:
        """A failure: one line in the status label, the full text in the log and through ``hooks.showError``."""
        message = str(exc).strip()
        summary = f"{label} failed: {type(exc).__name__}"
        first = one_line(message)
        self.setStatus(f"{summary}: {first}" if first else summary)
        LOG.error("%s failed", label, exc_info=(type(exc), exc, exc.__traceback__))
        try:
            self.hooks.showError(f"FMSeg: {label} failed", f"{type(exc).__name__}: {message}" if message else summary)
        except Exception:  # a failing dialog must not break the panel
            LOG.exception("showError failed")

    # ------------------------------------------------------------------------------------------------------------
    # Jobs

    def _connectArgs(self) -> dict:
        ui = self.ui
        return {"url": ui.serverUrlEdit.text.strip(), "token": ui.serverTokenEdit.text,
                "device": ui.deviceSelector.currentText or "auto"}

    def _connectAndList(self, args: dict) -> dict:
        """Worker thread: connect, and list the models when the answer does not."""
        info = self.logic.connect(**args)
        info = dict(info) if isinstance(info, dict) else {"info": info}
        if not info.get("models") and hasattr(self.logic, "models"):
            try:
                info["models"] = self.logic.models()
            except Exception:  # listing is a convenience: the connection itself worked
                LOG.exception("listing the models failed")
        return info

    def start(self, slot, label, call, args=(), kwargs=None, onDone=None, cancellable=False, reportsProgress=False,
              progressBar=None, formatter=_count_text, needsWorker=True):
        """Run ``call(*args, **kwargs)`` as the job of ``slot``. ``call`` is the name of a Logic method (its
        ``*_async`` variant is used when the Logic has one, else it goes through ``logic.submit``) or a function
        for ``logic.submit``. ``reportsProgress`` and ``cancellable`` add the ``progress=`` and ``cancel=`` keyword
        arguments. When the worker is not connected yet (``needsWorker``), connects first and starts the request
        after. Returns the job, or None (not started now)."""
        kwargs = dict(kwargs or {})
        if slot in self.jobs:
            self.setStatus(f"{label}: already running.")
            return None
        if needsWorker and self.connection is None:
            self._afterConnect.append(lambda: self.start(
                slot, label, call, args, kwargs, onDone=onDone, cancellable=cancellable,
                reportsProgress=reportsProgress, progressBar=progressBar, formatter=formatter))
            if not self.isRunning(CONNECT):
                self.connectWorker()
            return None
        job = _Job(slot, label, onDone, cancellable, progressBar, formatter)
        if reportsProgress:
            kwargs["progress"] = job.report
        if cancellable:
            kwargs["cancel"] = job.cancelEvent.is_set
        try:
            if callable(call):
                job.future = self.logic.submit(call, *args, **kwargs)
            elif hasattr(self.logic, call + "_async"):
                # reads the scene now (GUI thread), requests in the background; result() applies on this thread
                job.future = getattr(self.logic, call + "_async")(*args, **kwargs)
            else:
                job.future = self.logic.submit(getattr(self.logic, call), *args, **kwargs)
        except Exception as exc:
            self.reportError(label, exc)
            return None
        others = [other.label.lower() for other in self.jobs.values()]
        self.jobs[slot] = job
        if progressBar is not None:
            progressBar.value = 0
        # The Logic may run one request at a time: say what else is running.
        self.setStatus(f"{label}\u2026" + (f" ({', '.join(others)} still running)" if others else ""))
        if not self.timer.active:
            self.timer.start()
        self.updateButtons()
        return job

    def poll(self, *_args) -> None:
        """Timer slot (GUI thread): show progress, finish the jobs that are done."""
        if self._polling:  # a modal dialog opened by a callback runs the event loop: no re-entry
            return
        self._polling = True
        try:
            for slot, job in list(self.jobs.items()):
                self._showProgress(job)
                if job.future.done():
                    del self.jobs[slot]
                    self._finish(job)
            if not self.jobs:
                self.timer.stop()
        finally:
            self._polling = False
        self.updateButtons()

    def _showProgress(self, job: _Job) -> None:
        update = job.progress
        if update is None or update is job.shown:
            return
        job.shown = update
        fraction = update.fraction
        if job.progressBar is not None and fraction is not None:
            job.progressBar.value = int(round(100.0 * fraction))
        detail = job.formatter(update)
        if not job.cancelled():
            self.setStatus(f"{job.label}: {detail}" if detail else f"{job.label}\u2026")

    def _finish(self, job: _Job) -> None:
        elapsed = time.monotonic() - job.started
        try:
            result = job.future.result()  # a Pending writes its result into the scene here, on the GUI thread
        except Exception as exc:
            if job.slot == PROMPT:
                self.promptPending = False
            if job.slot == CONNECT:
                if self._offerInstall(exc):
                    return
                self._afterConnect = []
            if is_cancellation(exc):
                self.setStatus(f"{job.label} cancelled.")
                if job.progressBar is not None:
                    job.progressBar.value = 0
            else:
                self.reportError(job.label, exc)
            return
        if job.progressBar is not None:
            job.progressBar.value = 100
        if job.onDone is not None:
            try:
                job.onDone(result, elapsed)
            except Exception as exc:
                self.reportError(job.label, exc)

    def _offerInstall(self, exc: BaseException) -> bool:
        """A connection failed for missing packages: ask, then install them and connect again."""
        report = getattr(exc, "report", None)
        if type(exc).__name__ != "MissingDependencies" or report is None or not report.missing:
            return False
        if not self.hooks.confirmInstall(one_line(str(exc), 2000)):
            return False
        self.start(INSTALL, "Installing packages", "install_dependencies", (report,),
                   onDone=lambda *_: self.connectWorker(), needsWorker=False)
        return True

    def cancel(self, *_args) -> None:
        """Cancel every cancellable job (adaptation, adapter segmentation, in-context run)."""
        labels = []
        for job in self.jobs.values():
            if job.cancellable and not job.cancelled():
                job.cancelEvent.set()
                if hasattr(job.future, "cancel"):
                    job.future.cancel()  # a Future still waiting in the queue never starts
                labels.append(job.label)
        if labels:
            self.setStatus(f"Cancelling {', '.join(labels).lower()}\u2026")
        self.updateButtons()

    def shutdown(self) -> None:
        """Stop polling and cancel what can be cancelled (module cleanup)."""
        self.cancel()
        self.timer.stop()

    def reset(self) -> None:
        """The scene is closing: drop node references and cancel the cancellable jobs."""
        self.cancel()
        self.supports, self.cases = [], []
        self.promptPending = False
        self.refreshTables()
        self.updateButtons()

    # ------------------------------------------------------------------------------------------------------------
    # Worker and models

    def _connectionSettingsChanged(self, *_args) -> None:
        if self.connection is not None:
            self.connection = None
            self.setStatus("Worker settings changed: FMSeg connects again on the next run.")
        self.updateButtons()

    def connectWorker(self, *_args):
        """Start the local worker or connect to the remote one (panel settings), and list its models."""
        return self.start(CONNECT, "Connecting to the worker", self._connectAndList, (self._connectArgs(),),
                          onDone=self._connectDone, needsWorker=False)

    def _connectDone(self, info, elapsed) -> None:
        self._connected(info)
        waiting, self._afterConnect = self._afterConnect, []
        for startJob in waiting:
            startJob()

    def _connected(self, info) -> None:
        self.connection = info if isinstance(info, dict) else {"info": info}
        self.setModels(self.connection.get("models"))
        where = self.ui.serverUrlEdit.text.strip() or "local worker"
        details = [f"{key} {self.connection[key]}" for key in ("version", "device") if self.connection.get(key)]
        available = [card for card in self.models.values() if card.get("available")]
        models = f"; {len(available)} of {len(self.models)} models downloaded" if self.models else ""
        self.setStatus(f"Connected to {where}" + (f" ({', '.join(details)})" if details else "") + models + ".")

    def setModels(self, models) -> None:
        """Fill the model selectors from zoo cards, keeping the current choices when they are still listed."""
        cards = model_cards(models)
        if not cards:
            return
        self.models = {card["id"]: card for card in cards}
        # weights-only models are not listed: nothing in FMSeg runs them yet
        prompt = [c["id"] for c in cards if c["kind"] in (families.PROMPTABLE, None)]
        incontext = [c["id"] for c in cards if c["kind"] in (families.INCONTEXT, None)]
        self._fillCombo(self.ui.promptModelSelector, prompt)
        self._fillCombo(self.ui.incontextModelSelector, incontext)

    def _fillCombo(self, combo, ids) -> None:
        if not ids:
            return
        current = combo.currentText
        combo.clear()
        for model_id in ids:
            combo.addItem(model_id)
        index = combo.findText(current)
        combo.currentIndex = index if index >= 0 else 0

    def selectedModels(self) -> list[str]:
        ids = []
        for combo in (self.ui.promptModelSelector, self.ui.incontextModelSelector):
            if combo.currentText and combo.currentText not in ids:
                ids.append(combo.currentText)
        return ids

    def downloadModels(self, *_args):
        """Download the selected models that the worker did not report as available."""
        wanted = [m for m in self.selectedModels() if not (self.models.get(m) or {}).get("available")]
        if not wanted:
            self.setStatus("The selected models are already downloaded.")
            return None
        def run(progress=None):
            for model_id in wanted:
                self.logic.download_model(  # the status names the model, the worker's message aside
                    model_id, progress=lambda update, m=model_id: progress(dataclasses.replace(update, message=m)))
            return wanted

        return self.start(DOWNLOAD, "Download", run, onDone=self._downloadDone, reportsProgress=True,
                          progressBar=self.ui.downloadProgressBar, formatter=_percent_text)

    def _downloadDone(self, ids, elapsed) -> None:
        for model_id in ids or ():
            self.models.setdefault(model_id, {"id": model_id, "kind": None})["available"] = True
        self.setStatus(f"Downloaded {', '.join(ids or ())} in {elapsed:.0f} s.")

    def importWeights(self, *_args):
        """Install a checkpoint file downloaded by hand as the weights of a selected model: each selected model
        without weights in turn (all of them when every one has weights) is offered a file dialog until the user
        chooses a file; weights already there are replaced only after asking. The worker checks the file; a wrong
        one is its one line in the status and changes nothing."""
        if self.connection is None:  # which models have weights is the worker's to say: connect first
            self._afterConnect.append(self.importWeights)
            if not self.isRunning(CONNECT):
                self.connectWorker()
            return None
        if self.isRunning(DOWNLOAD):
            self.setStatus("Import: a download or import is running; try again when it ends.")
            return None
        selected = self.selectedModels()
        missing = [m for m in selected if not (self.models.get(m) or {}).get("available")]
        model, path = None, ""
        for model in missing or selected:
            path = self.hooks.chooseWeightsPath(model)
            if path:
                break
        if not path:
            return None
        replace = bool((self.models.get(model) or {}).get("available"))
        if replace and not self.hooks.confirm(
                "FMSeg: replace weights", f"{model} has weights already. Replace them with {path}? The worker "
                                          "checks the file first and keeps the installed weights if it refuses it."):
            self.setStatus(f"Import cancelled: {model} keeps its weights.")
            return None
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        return self.start(DOWNLOAD, f"Importing {name} as {model}'s weights", "import_weights", (model, str(path)),
                          {"replace": replace}, onDone=self._importDone)

    def _importDone(self, info, elapsed) -> None:
        info = info if isinstance(info, dict) else {}
        self.setModels(info.get("models"))  # the worker's cards again: the model has weights now
        model = info.get("model", "the model")
        check = "verified against its published sha256" if info.get("verified") else "no published sha256 to verify"
        self.setStatus(f"Imported {model}'s weights in {elapsed:.1f} s ({check}): {info.get('path', '')}")

    # ------------------------------------------------------------------------------------------------------------
    # Prompts

    def segment(self, *_args):
        """Segment from the current prompts (points, boxes, ROIs) into the segment named in the panel."""
        ui = self.ui
        volume, segmentation = self.inputs()
        if volume is None or segmentation is None:
            self.setStatus("Select a volume and a segmentation first.")
            return None
        if self.isRunning(PROMPT) or self.connecting():
            self.promptPending = True
            return None
        self.promptPending = False
        name = ui.segmentNameEdit.text.strip() or DEFAULT_SEGMENT_NAME
        curves = self.hooks.promptCurves() or ([], [])
        return self.start(
            PROMPT, "Segment", "prompt", (volume, segmentation, name), dict(
                include_points=ui.includePointsPlaceWidget.currentNode(),
                exclude_points=ui.excludePointsPlaceWidget.currentNode(),
                rois=list(self.hooks.promptRois() or ()),
                include_curves=list(curves[0]), exclude_curves=list(curves[1]),
                model=ui.promptModelSelector.currentText,
                use_adapter=bool(ui.promptAdapterCheckBox.checked and self.adapterFor("prompt"))),
            onDone=lambda segmentId, elapsed: self._promptDone(name, segmentId, elapsed))

    def _promptDone(self, name, segmentId, elapsed) -> None:
        self.setStatus(f"Segmented '{name}' in {elapsed:.1f} s.")
        self.hooks.resultReady("prompt", segmentId)
        if self.promptPending:
            self.promptPending = False
            if self.ui.autoUpdateCheckBox.checked:
                self.segment()

    def promptChanged(self, *_args) -> None:
        """A point, box or ROI was placed or moved: segment again when "Update after each prompt" is on. While a
        prompt runs, one more run is queued (the latest prompts are read when it starts)."""
        if not self.ui.autoUpdateCheckBox.checked:
            return
        volume, segmentation = self.inputs()
        if volume is None or segmentation is None:
            return
        if self.isRunning(PROMPT) or self.connecting():
            self.promptPending = True
            return
        self.segment()

    def undo(self, *_args) -> bool:
        """Restore the segments as they were before the last result (GUI thread: the Logic edits MRML nodes)."""
        segmentation = self.ui.segmentationSelector.currentNode()
        if segmentation is None:
            self.setStatus("Select a segmentation first.")
            return False
        if self.isRunning(PROMPT):
            self.setStatus("Undo waits for the running segmentation to finish.")
            return False
        try:
            undone = bool(self.logic.undo(segmentation))
        except Exception as exc:
            self.reportError("Undo", exc)
            return False
        self.setStatus("Undone: the segments are back as they were before the last result."
                       if undone else "Nothing to undo.")
        return undone

    def clearPrompts(self, *_args) -> None:
        self._setPlacingButtons(None)
        self.hooks.clearPrompts()
        self.promptPending = False
        self.setStatus("Prompts cleared.")

    def placeInclude(self, *_args) -> None:
        self._setPlacingButtons(None)
        self.ui.excludePointsPlaceWidget.placeModeEnabled = False
        self.ui.includePointsPlaceWidget.placeModeEnabled = True

    def placeExclude(self, *_args) -> None:
        self._setPlacingButtons(None)
        self.ui.includePointsPlaceWidget.placeModeEnabled = False
        self.ui.excludePointsPlaceWidget.placeModeEnabled = True

    def toggleBox(self, *_args) -> None:
        self._togglePlacing("box")

    def toggleRoi(self, *_args) -> None:
        self._togglePlacing("roi")

    def toggleScribble(self, *_args) -> None:
        self._togglePlacing("scribble")

    def toggleExcludeScribble(self, *_args) -> None:
        self._togglePlacing("exclude-scribble")

    def toggleLasso(self, *_args) -> None:
        self._togglePlacing("lasso")

    def toggleExcludeLasso(self, *_args) -> None:
        self._togglePlacing("exclude-lasso")

    def _togglePlacing(self, kind) -> None:
        button = getattr(self.ui, PLACING_BUTTONS[kind])
        button.checked = not button.checked

    def placingFinished(self, *_args) -> None:
        """The views left place mode (the box, ROI or curve is placed, or the user pressed Escape)."""
        self._syncingPlacing = True
        try:
            self._setPlacingButtons(None)
        finally:
            self._syncingPlacing = False

    def _setPlacingButtons(self, kind) -> None:
        """Check the button of ``kind`` only (None: none)."""
        for other, name in PLACING_BUTTONS.items():
            button = getattr(self.ui, name)
            if button.checked != (other == kind):
                button.checked = other == kind

    def _onPlacingToggled(self, kind) -> None:
        """One tool places at a time: a checked button unchecks the others and leaves point place mode."""
        enabled = bool(getattr(self.ui, PLACING_BUTTONS[kind]).checked)
        if enabled:
            for other, name in PLACING_BUTTONS.items():
                if other != kind:
                    getattr(self.ui, name).checked = False
            self.ui.includePointsPlaceWidget.placeModeEnabled = False
            self.ui.excludePointsPlaceWidget.placeModeEnabled = False
        if self._syncingPlacing:
            return
        try:
            self.hooks.setPlacing(kind, enabled)
        except Exception as exc:
            self.reportError(f"Placing {PLACING_NAMES[kind]}", exc)

    # ------------------------------------------------------------------------------------------------------------
    # Support set and cases

    def describe(self, volume, segmentation):
        return self.hooks.describePair(volume, segmentation)

    def fillTable(self, table, rows) -> None:
        """Rows of (volume name, segmentation name, segment names) into a 3-column table."""
        table.rowCount = len(rows)
        for row, (volumeName, segmentationName, segmentNames) in enumerate(rows):
            names = segmentNames if isinstance(segmentNames, str) else ", ".join(str(n) for n in segmentNames)
            for column, text in enumerate((volumeName, segmentationName, names)):
                table.setItem(row, column, self.qt.QTableWidgetItem(str(text)))

    def refreshTables(self) -> None:
        for table, pairs in ((self.ui.supportTable, self.supports), (self.ui.caseTable, self.cases)):
            rows = []
            for volume, segmentation in pairs:
                volumeName, segmentationName, _ids, names = self.describe(volume, segmentation)
                rows.append((volumeName, segmentationName, names))
            self.fillTable(table, rows)

    def _addPair(self, pairs, volume, segmentation, what) -> bool:
        if volume is None or segmentation is None:
            self.setStatus(f"Select the {what} volume and its segmentation first.")
            return False
        if any(v is volume and s is segmentation for v, s in pairs):
            self.setStatus(f"This {what} pair is already in the list.")
            return False
        volumeName, segmentationName, ids, _names = self.describe(volume, segmentation)
        if not ids:
            self.setStatus(f"'{segmentationName}' has no segments: nothing to learn from.")
            return False
        pairs.append((volume, segmentation))
        self.refreshTables()
        self.setStatus(f"Added {volumeName} / {segmentationName} ({len(ids)} segments).")
        self.updateButtons()
        return True

    def _removePair(self, pairs, table) -> None:
        if not pairs:
            return
        row = table.currentRow()
        pairs.pop(row if 0 <= row < len(pairs) else len(pairs) - 1)
        self.refreshTables()
        self.updateButtons()

    def addSupport(self, *_args) -> bool:
        ui = self.ui
        return self._addPair(self.supports, ui.supportVolumeSelector.currentNode(),
                             ui.supportSegmentationSelector.currentNode(), "support")

    def removeSupport(self, *_args) -> None:
        self._removePair(self.supports, self.ui.supportTable)

    def addCase(self, *_args) -> bool:
        ui = self.ui
        return self._addPair(self.cases, ui.caseVolumeSelector.currentNode(),
                             ui.caseSegmentationSelector.currentNode(), "case")

    def removeCase(self, *_args) -> None:
        self._removePair(self.cases, self.ui.caseTable)

    def forgetNode(self, node) -> None:
        """A node left the scene: drop the support/case rows that use it."""
        before = len(self.supports) + len(self.cases)
        self.supports = [p for p in self.supports if node is not p[0] and node is not p[1]]
        self.cases = [p for p in self.cases if node is not p[0] and node is not p[1]]
        if len(self.supports) + len(self.cases) != before:
            self.refreshTables()
            self.updateButtons()

    def _withSegments(self, pairs):
        out = []
        for volume, segmentation in pairs:
            _v, _s, ids, _names = self.describe(volume, segmentation)
            out.append((volume, segmentation, list(ids)))
        return out

    # ------------------------------------------------------------------------------------------------------------
    # In-context

    def runInContext(self, *_args):
        """Segment the input volume: with the loaded task when there is one, else like the support set shows."""
        ui = self.ui
        volume, segmentation = self.inputs()
        if volume is None or segmentation is None:
            self.setStatus("Select a volume and a segmentation first.")
            return None
        if self.task:
            return self.start(
                INCONTEXT, "In-context segmentation (task)", "run_task", (volume, segmentation),
                dict(uncertainty=bool(ui.uncertaintyCheckBox.checked)),
                onDone=self._incontextDone, cancellable=True, reportsProgress=True)
        if not self.supports:
            self.setStatus("Add at least one labelled support case, or load a task.")
            return None
        model = ui.incontextModelSelector.currentText
        candidates = int(ui.candidatesSpinBox.value) if self.isStochastic(model) else 0
        return self.start(
            INCONTEXT, "In-context segmentation", "run_incontext",
            (volume, segmentation, self._withSegments(self.supports)),
            dict(support_size=int(ui.supportSizeSpinBox.value), ensemble=int(ui.ensembleSpinBox.value),
                 uncertainty=bool(ui.uncertaintyCheckBox.checked), model=model,
                 **({"candidates": candidates} if candidates else {})),
            onDone=self._incontextDone, cancellable=True, reportsProgress=True)

    def _incontextDone(self, result, elapsed) -> None:
        segments = result.get("segments") if isinstance(result, dict) else result
        count = len(segments) if isinstance(segments, (list, tuple)) else 0
        uncertainty = isinstance(result, dict) and result.get("uncertainty_node") is not None
        drawn = len((result.get("candidate_nodes") or ()) if isinstance(result, dict) else ())
        added = [*(["uncertainty volume"] if uncertainty else []),
                 *([f"{drawn} candidate segmentation{'s' if drawn != 1 else ''} (hidden)"] if drawn else [])]
        self.setStatus(f"In-context: {count} segment{'s' if count != 1 else ''} in {elapsed:.1f} s"
                       + (f", {' and '.join(added)} added." if added else "."))
        self.hooks.resultReady("incontext", result)

    def saveTask(self, *_args):
        """Encode the support set into a task of the selected 3-D in-context model (on the worker) and write the
        task file where the user chooses."""
        model = self.ui.incontextModelSelector.currentText
        if not self.supports:
            self.setStatus("Add at least one labelled support case to build a task from.")
            return None
        if self.modelDims(model) != 3:
            self.setStatus(f"'{model}' is not a 3-D in-context model: choose one (e.g. iris-fmseg) to build a task.")
            return None
        path = self.hooks.chooseTaskPath(True)
        if not path:
            return None
        # overwrite: the save dialog has asked the user about an existing file
        return self.start(INCONTEXT, "Saving the task", "save_task", (self._withSegments(self.supports), str(path)),
                          dict(model=model, overwrite=True),
                          onDone=lambda info, elapsed: self.setStatus(
                              f"Task saved to {path} in {elapsed:.1f} s ({describe_task(info)})."),
                          cancellable=True, reportsProgress=True)

    def loadTask(self, *_args):
        """Upload a task file to the worker; in-context runs then use it instead of the support set."""
        path = self.hooks.chooseTaskPath(False)
        if not path:
            return None

        def loaded(info, elapsed):
            info = dict(info) if isinstance(info, dict) else {"info": info}
            info.setdefault("path", str(path))
            self._setTask(info)
            self.setStatus(f"Task loaded: in-context runs use it until it is cleared. {self.ui.taskLabel.text}")

        return self.start(INCONTEXT, "Loading the task", "load_task", (str(path),), onDone=loaded)

    def clearTask(self, *_args) -> None:
        """Forget the loaded task: in-context runs use the support set again."""
        if self.isRunning(INCONTEXT):
            self.setStatus("Clearing the task waits for the running in-context job.")
            return
        try:
            self.logic.clear_task()
        except Exception as exc:
            self.reportError("Clearing the task", exc)
            return
        self._setTask(None)
        self.setStatus("Task cleared: in-context runs use the support set.")

    def _setTask(self, info) -> None:
        self.task = info or None
        self.ui.taskLabel.text = describe_task(self.task)
        self.ui.runInContextButton.text = "Segment with task" if self.task else "Segment from support set"
        self.updateButtons()

    # ------------------------------------------------------------------------------------------------------------
    # Adaptation

    def adapt(self, *_args):
        ui = self.ui
        if not self.cases:
            self.setStatus("Add at least one labelled case.")
            return None
        return self.start(
            ADAPTER, "Adaptation", "adapt", (self._withSegments(self.cases),),
            dict(mode=ui.adaptModeSelector.currentText, method=ui.methodSelector.currentText,
                 rank=int(ui.rankSpinBox.value), steps=int(ui.stepsSpinBox.value)),
            onDone=self._adaptDone, cancellable=True, reportsProgress=True, progressBar=ui.adaptProgressBar,
            formatter=_steps_text)

    def _adaptDone(self, info, elapsed) -> None:
        self._setAdapter(info)
        self.setStatus(f"Adaptation finished in {elapsed:.0f} s. {self.ui.adapterLabel.text}")

    def _setAdapter(self, info) -> None:
        self.adapter = info if info is not None else {}
        self.ui.adapterLabel.text = describe_adapter(self.adapter)
        self.updateButtons()

    def saveAdapter(self, *_args):
        if self.adapter is None:
            self.setStatus("No adapter to save: adapt or load one first.")
            return None
        path = self.hooks.chooseAdapterPath(True)
        if not path:
            return None
        # overwrite: the save dialog has asked the user about an existing file
        return self.start(ADAPTER, "Saving the adapter", "save_adapter", (str(path),), {"overwrite": True},
                          onDone=lambda _r, _e: self.setStatus(f"Adapter saved to {path}."))

    def loadAdapter(self, *_args):
        path = self.hooks.chooseAdapterPath(False)
        if not path:
            return None

        def loaded(info, elapsed):
            info = dict(info) if isinstance(info, dict) else {"info": info}
            info.setdefault("path", str(path))
            self._setAdapter(info)
            self.setStatus(f"Adapter loaded. {self.ui.adapterLabel.text}")

        return self.start(ADAPTER, "Loading the adapter", "load_adapter", (str(path),), onDone=loaded)

    def segmentWithAdapter(self, *_args):
        volume, segmentation = self.inputs()
        if volume is None or segmentation is None:
            self.setStatus("Select a volume and a segmentation first.")
            return None
        if not self.adapterFor("auto"):
            self.setStatus("Adapt or load an automatic ('auto' mode) adapter first.")
            return None
        return self.start(ADAPTER, "Adapter segmentation", "segment_with_adapter", (volume, segmentation),
                          onDone=self._adapterSegmentDone, cancellable=True, reportsProgress=True,
                          progressBar=self.ui.adaptProgressBar)

    def _adapterSegmentDone(self, segmentIds, elapsed) -> None:
        count = len(segmentIds) if isinstance(segmentIds, (list, tuple)) else 0
        self.setStatus(f"Adapter segmented {count} structure{'s' if count != 1 else ''} in {elapsed:.1f} s.")
        self.hooks.resultReady("adapter-segment", segmentIds)
