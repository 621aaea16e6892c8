package daemon

import (
	"fmt"
	"net"
	"os"
)

// sdNotify sends state to the service manager (sd_notify(3)) when it
// started the daemon with $NOTIFY_SOCKET (systemd, Type=notify); without
// one it does nothing. A socket path or an abstract one ("@name").
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] != '/' && path[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET=%s: not a unix socket", path)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("NOTIFY_SOCKET=%s: %w", path, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("NOTIFY_SOCKET=%s: %w", path, err)
	}
	return nil
}
