// containerd's own snapshotter conformance suite (snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev), run against `lazylayer snapshotter` through
// containerd's proxy client: the same path containerd takes to a [proxy_plugins] snapshotter.
//
// Each sub-test gets a fresh snapshotter process on the suite's root directory, as the suite
// gives each a fresh snapshotter. Built and run by tests/snapshotter.rs (GOPATH mode, as root,
// with -test.root; the suite itself clears the umask).
package suite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestLazylayerSnapshotter(t *testing.T) {
	binary := os.Getenv("LAZYLAYER_BIN")
	if binary == "" {
		t.Fatal("LAZYLAYER_BIN must name the lazylayer binary")
	}
	testsuite.SnapshotterSuite(t, "lazylayer", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return start(binary, root)
	})
}

// start runs `lazylayer snapshotter` on root and connects containerd's proxy client to it.
func start(binary, root string) (snapshots.Snapshotter, func() error, error) {
	dir := filepath.Dir(root)
	socket := filepath.Join(dir, "snapshotter.sock")
	log, err := os.Create(filepath.Join(dir, "snapshotter.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(binary, "snapshotter", "--root", root, "--address", socket,
		"--cache-dir", "none")
	cmd.Env = append(os.Environ(), "LAZYLAYER_RUN_DIR="+filepath.Join(dir, "run"),
		"LAZYLAYER_CONFIG=/dev/null")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		return log.Close()
	}
	// Ready once a connection is accepted: the socket file can exist a moment before anyone
	// listens on it (21 snapshotters start at once on two cores).
	deadline := time.Now().Add(30 * time.Second)
	for {
		if probe, err := net.Dial("unix", socket); err == nil {
			probe.Close()
			break
		}
		if time.Now().After(deadline) {
			stop()
			text, _ := os.ReadFile(log.Name())
			return nil, nil, fmt.Errorf("snapshotter did not listen on %s: %s", socket, text)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The socket path is no valid HTTP/2 :authority; name one, as containerd does.
	conn, err := grpc.Dial(socket, grpc.WithInsecure(), grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazylayer")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}
