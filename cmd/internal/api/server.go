package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/robib/robib/cluster"
)

// maxBody bounds every request body.
const maxBody = 1 << 20

// NewHandler returns a mux serving svc under /v1; callers may mount more
// handlers on it (the cluster's /internal/ endpoints).
func NewHandler(svc Service, log *slog.Logger) *http.ServeMux {
	if log == nil {
		log = slog.Default()
	}
	h := &handler{svc: svc, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/volumes", h.listVolumes)
	mux.HandleFunc("POST /v1/volumes", h.createVolume)
	mux.HandleFunc("GET /v1/volumes/{name}", h.getVolume)
	mux.HandleFunc("DELETE /v1/volumes/{name}", h.deleteVolume)
	mux.HandleFunc("POST /v1/volumes/{name}/resize", h.resizeVolume)
	mux.HandleFunc("POST /v1/volumes/{name}/verify", h.verifyVolume)
	mux.HandleFunc("POST /v1/volumes/{name}/repair", h.repairVolume)
	mux.HandleFunc("GET /v1/volumes/{name}/stage", h.writeStage)
	mux.HandleFunc("GET /v1/cluster/status", h.clusterStatus)
	mux.HandleFunc("POST /v1/cluster/leave", h.leave)
	mux.HandleFunc("POST /v1/cluster/remove", h.removeSite)
	mux.HandleFunc("POST /v1/cluster/transfer-leadership", h.transferLeadership)
	mux.HandleFunc("GET /v1/cluster/keyring", h.keyring)
	mux.HandleFunc("POST /v1/cluster/keyring", h.changeKeyring)
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	return mux
}

// NewServer wraps a handler in an http.Server with sane timeouts.
func NewServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
}

type handler struct {
	svc Service
	log *slog.Logger
}

func (h *handler) listVolumes(w http.ResponseWriter, r *http.Request) {
	vols, err := h.svc.ListVolumes(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if vols == nil {
		vols = []Volume{}
	}
	writeJSON(w, http.StatusOK, vols)
}

func (h *handler) createVolume(w http.ResponseWriter, r *http.Request) {
	var req CreateVolumeRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	v, err := h.svc.CreateVolume(r.Context(), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, v)
}

func (h *handler) writeStage(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.WriteStage(r.Context(), r.PathValue("name"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (h *handler) getVolume(w http.ResponseWriter, r *http.Request) {
	v, err := h.svc.GetVolume(r.Context(), r.PathValue("name"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *handler) deleteVolume(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.DeleteVolume(r.Context(), r.PathValue("name")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) resizeVolume(w http.ResponseWriter, r *http.Request) {
	var req ResizeVolumeRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	v, err := h.svc.ResizeVolume(r.Context(), r.PathValue("name"), req.Size)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *handler) verifyVolume(w http.ResponseWriter, r *http.Request) {
	var req VerifyRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	res, err := h.svc.VerifyVolume(r.Context(), r.PathValue("name"), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (h *handler) repairVolume(w http.ResponseWriter, r *http.Request) {
	var req RepairRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	res, err := h.svc.RepairVolume(r.Context(), r.PathValue("name"), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (h *handler) clusterStatus(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.ClusterStatus(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (h *handler) leave(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.Leave(r.Context()); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) removeSite(w http.ResponseWriter, r *http.Request) {
	var req SiteRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := h.svc.RemoveSite(r.Context(), req.Site); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) transferLeadership(w http.ResponseWriter, r *http.Request) {
	var req SiteRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	leader, err := h.svc.TransferLeadership(r.Context(), req.Site)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"leader": leader})
}

func (h *handler) keyring(w http.ResponseWriter, r *http.Request) {
	rep, err := h.svc.Keyring(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

func (h *handler) changeKeyring(w http.ResponseWriter, r *http.Request) {
	var req KeyringRequest
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	rep, err := h.svc.ChangeKeyring(r.Context(), req)
	if err != nil {
		// The per-site report says where it failed: sent with the error.
		writeError(w, r, err, h.log, keyringError{ErrorBody: ErrorBody{Error: err.Error()}, Report: rep})
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

// keyringError is a failed keyring change's answer: the error and what
// every site said.
type keyringError struct {
	ErrorBody
	Report cluster.KeyringReport `json:"report"`
}

// decode reads one JSON object, bounded in size, rejecting unknown fields and
// trailing data.
func decode(w http.ResponseWriter, r *http.Request, dst any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return fmt.Errorf("%w: request body: %v", ErrBadRequest, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: request body: trailing data after JSON object", ErrBadRequest)
	}
	return nil
}

// StatusOf maps a Service error to an HTTP status: its row in
// statusTable, or 500.
func StatusOf(err error) int {
	for _, r := range statusTable {
		if errors.Is(err, r.err) {
			return r.status
		}
	}
	return http.StatusInternalServerError
}

func (h *handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	WriteError(w, r, err, h.log)
}

// WriteError answers a request with err: the status of its statusTable
// row (500 if none) and an ErrorBody, logged (errors at 5xx, refusals and
// bad requests at info). Handlers mounted beside the API's (the
// authorization guard) use it so every error is mapped here, once.
func WriteError(w http.ResponseWriter, r *http.Request, err error, log *slog.Logger) {
	writeError(w, r, err, log, ErrorBody{Error: err.Error()})
}

// writeError is WriteError with the answer's body given.
func writeError(w http.ResponseWriter, r *http.Request, err error, log *slog.Logger, body any) {
	if log == nil {
		log = slog.Default()
	}
	status := StatusOf(err)
	lvl := slog.LevelInfo
	if status >= 500 {
		lvl = slog.LevelError
	}
	log.Log(r.Context(), lvl, "api request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	writeJSON(w, status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
